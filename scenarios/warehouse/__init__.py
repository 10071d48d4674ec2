"""Warehouse domain: lifelong multi-robot pickup and delivery on a grid (vectorised numpy).

Importing this package only registers names; the env (:mod:`scenarios.warehouse.env`), map
loader (:mod:`scenarios.warehouse.layout`) and controllers
(:mod:`scenarios.warehouse.controllers`) load when first used. Maps live in ``maps/``; load your
own MovingAI ``.map`` with ``--set map_file=PATH``.
"""

from marl.core.registry import ControllerSpec, ScenarioSpec, register_controller, register_scenario

__all__: list[str] = []

_ENV = "scenarios.warehouse.env:WarehouseEnv"
_TEST = {"horizon": 50}


def _warehouse(size: str, n_robots: int, floor: str) -> None:
    """Register ``warehouse/<size>`` on ``maps/<size>.map``: ``n_robots`` robots (one agent
    each); ``floor`` describes the map (size, racks, stations). Test presets shorten the
    horizon only."""
    register_scenario(
        ScenarioSpec(
            id=f"warehouse/{size}",
            entry_point=_ENV,
            description=f"{n_robots} robots, {floor}; lifelong pick and delivery",
            simulator="numpy",
            n_agents=n_robots,
            kwargs={"map_file": f"{size}.map", "n_robots": n_robots},
            test_kwargs=_TEST,
            default_controller="prioritized",
        )
    )


_warehouse("small", 10, "9x28 floor, 72 racks, 4 stations")
_warehouse("medium", 50, "18x44 floor, 300 racks, 10 stations")
_warehouse("large", 200, "39x84 floor, 1440 racks, 24 stations")

_CTRL = "scenarios.warehouse.controllers:"
for _name, _cls, _text in (
    ("random", "RandomController", "uniform random valid moves"),
    ("greedy", "GreedyController", "each robot steps along its shortest path; waits on conflict"),
    ("prioritized", "PrioritizedController",
     "windowed cooperative A* with a reservation table (WHCA*, Silver 2005)"),
):  # fmt: skip
    register_controller(ControllerSpec("warehouse", _name, _CTRL + _cls, _text))
