"""Warehouse domain: lifelong multi-robot pickup and delivery on a grid (vectorised numpy).

Importing this package only registers names; the env (:mod:`scenarios.warehouse.env`), map
loader (:mod:`scenarios.warehouse.layout`) and controllers
(:mod:`scenarios.warehouse.controllers`) load when first used. Maps live in ``maps/``; load your
own MovingAI ``.map`` with ``--set map_file=PATH``.
"""

from marl.registry import ControllerSpec, ScenarioSpec, register_controller, register_scenario

_ENV = "scenarios.warehouse.env:WarehouseEnv"
_TEST = {"horizon": 50}

register_scenario(
    ScenarioSpec(
        id="warehouse/small",
        entry_point=_ENV,
        description="10 robots, 9x28 floor, 72 racks, 4 stations; lifelong pick and delivery",
        simulator="numpy",
        n_agents=10,
        kwargs={"map_file": "small.map", "n_robots": 10},
        test_kwargs=_TEST,
        default_controller="prioritized",
    )
)
register_scenario(
    ScenarioSpec(
        id="warehouse/medium",
        entry_point=_ENV,
        description="50 robots, 18x44 floor, 300 racks, 10 stations; lifelong pick and delivery",
        simulator="numpy",
        n_agents=50,
        kwargs={"map_file": "medium.map", "n_robots": 50},
        test_kwargs=_TEST,
        default_controller="prioritized",
    )
)
register_scenario(
    ScenarioSpec(
        id="warehouse/large",
        entry_point=_ENV,
        description="200 robots, 39x84 floor, 1440 racks, 24 stations; lifelong pick and delivery",
        simulator="numpy",
        n_agents=200,
        kwargs={"map_file": "large.map", "n_robots": 200},
        test_kwargs=_TEST,
        default_controller="prioritized",
    )
)

_CTRL = "scenarios.warehouse.controllers:"
register_controller(
    ControllerSpec("warehouse", "random", _CTRL + "RandomController", "uniform random valid moves")
)
register_controller(
    ControllerSpec(
        "warehouse", "greedy", _CTRL + "GreedyController", "each robot steps along its shortest path; waits on conflict"
    )
)
register_controller(
    ControllerSpec(
        "warehouse",
        "prioritized",
        _CTRL + "PrioritizedController",
        "windowed cooperative A* with a reservation table (WHCA*, Silver 2005)",
    )
)
