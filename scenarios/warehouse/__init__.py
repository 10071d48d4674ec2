"""Warehouse domain: lifelong multi-robot pickup and delivery on a grid (vectorised numpy).

Importing this package only registers names; the env (:mod:`scenarios.warehouse.env`), map
loader (:mod:`scenarios.warehouse.layout`) and controllers
(:mod:`scenarios.warehouse.controllers`) load when first used. Maps live in ``maps/``; load your
own MovingAI ``.map`` with ``--set map_file=PATH`` (past 62,500 cells add ``--set dist_cache=K``:
distance fields on demand instead of dense tables, as warehouse/xl does).
"""

from dataclasses import replace

from marl.core.registry import ControllerSpec, ScenarioSpec, TrainingPreset, register_controller, register_scenario

__all__: list[str] = []

_ENV = "scenarios.warehouse.env:WarehouseEnv"
_TEST = {"horizon": 50}

#: Reward terms every warehouse scenario uses (env card, ``shaping``): potential-based shaping on
#: the remaining shortest-path length of each robot's task, its discount equal to the preset's
#: gamma so the optimal policies are those of the unshaped reward. KPIs and the controllers'
#: actions do not depend on it; only the ``return`` column does.
_REWARD = {"shaping": 0.05, "shaping_gamma": 0.99}

#: What ``marl train warehouse/small`` uses unless told otherwise (the larger floors take the same
#: settings, unmeasured there). ``deterministic_eval=false``:
#: the trained policy acts by sampling, as it did in training; its most likely action locks robots
#: head-on in the one-cell station bays (issue 15: 0.189 vs 0.250 deliveries/step, seed 1).
_SMALL_TRAINING = TrainingPreset(
    algo="ippo",
    protocol="none",
    steps=100_000,
    algo_set={"learning_rate": 1e-3, "deterministic_eval": False},
    note=(
        "issue 15: warehouse/small, 10 held-out episodes (marl run --episodes 10 --seed 100), seeds 7/1/2, "
        "about 7 min each on a loaded core: 0.259 +- 0.011 deliveries/step vs greedy 0.055, prioritized 0.265 "
        "(results/reference/learn_warehouse_small.md)"
    ),
)

_UNMEASURED = "warehouse/small's settings; no training sweep on this floor yet (issue 15)"


def _warehouse(size: str, n_robots: int, floor: str, training: TrainingPreset) -> None:
    """Register ``warehouse/<size>`` on ``maps/<size>.map``: ``n_robots`` robots (one agent
    each); ``floor`` describes the map (size, racks, stations); ``training`` the defaults of
    ``marl train``. Test presets shorten the horizon only."""
    register_scenario(
        ScenarioSpec(
            id=f"warehouse/{size}",
            entry_point=_ENV,
            description=f"{n_robots} robots, {floor}; lifelong pick and delivery",
            simulator="numpy",
            n_agents=n_robots,
            kwargs={"map_file": f"{size}.map", "n_robots": n_robots, **_REWARD},
            test_kwargs=_TEST,
            default_controller="prioritized",
            training=training,
        )
    )


_warehouse("small", 10, "9x28 floor, 72 racks, 4 stations", _SMALL_TRAINING)
_MEDIUM_NOTE = (
    "warehouse/small's settings, measured on medium (issue 15): 10 held-out episodes, seeds 7/1/2, about "
    "4-6 min each on a loaded core: 0.686 +- 0.036 deliveries/step vs greedy 0.114, prioritized 0.766 "
    "(results/reference/learn_warehouse_medium.md)"
)
_warehouse("medium", 50, "18x44 floor, 300 racks, 10 stations", replace(_SMALL_TRAINING, note=_MEDIUM_NOTE))
_warehouse("large", 200, "39x84 floor, 1440 racks, 24 stations", replace(_SMALL_TRAINING, note=_UNMEASURED))

#: warehouse/xl: League-of-Robot-Runners size. Its 498 x 500 floor has 75,030 goal cells, whose
#: dense tables would need about 93 GB, so it runs on a distance-field cache of at most
#: ``dist_cache`` fields (LRU, 1 MiB each). The test preset keeps the same settings on the
#: large floor with 50 robots (a scaled-down xl: lazy distances, the rolling planner), so the
#: conformance suite stays cheap.
_XL_CACHE = 512
register_scenario(
    ScenarioSpec(
        id="warehouse/xl",
        entry_point=_ENV,
        description="10000 robots, 498x500 floor, 148500 racks, 330 stations; distance fields cached on demand",
        simulator="numpy",
        n_agents=None,  # 10,000; the test preset runs 50 on the large floor
        kwargs={"map_file": "xl.map", "n_robots": 10_000, "dist_cache": _XL_CACHE, "horizon": 500},
        test_kwargs={"map_file": "large.map", "n_robots": 50, "dist_cache": 64, "horizon": 30},
        default_controller="rolling",
        # greedy and prioritized read an exact field per robot's goal every step: at 10,000
        # robots that is thousands of BFS a step through a 512-field cache (minutes per step)
        controllers=("random", "rolling"),
        training=replace(_SMALL_TRAINING, note="warehouse/small's settings; nobody has trained on 10,000 robots"),
    )
)

_CTRL = "scenarios.warehouse.controllers:"
for _name, _cls, _text in (
    ("random", "RandomController", "uniform random valid moves"),
    ("greedy", "GreedyController", "each robot steps along its shortest path; waits on conflict"),
    ("prioritized", "PrioritizedController",
     "windowed cooperative A* with a reservation table (WHCA*, Silver 2005)"),
    ("rolling", "RollingController",
     "rolling-horizon prioritized planning in a time budget per step, rule-based fallback (10,000 robots)"),
):  # fmt: skip
    register_controller(ControllerSpec("warehouse", _name, _CTRL + _cls, _text))
