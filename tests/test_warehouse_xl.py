"""warehouse/xl: lazy distance fields (bounded LRU), Manhattan goal features, the rolling planner.

The full xl floor (498 x 500, 10,000 robots) is stepped once here; everything else runs on the
shipped large floor with a distance-field cache (the test preset of warehouse/xl), checked
against the dense tables of the same floor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from marl.cli import main
from marl.core.errors import ConfigError
from marl.core.registry import make_scenario
from marl.runner import build_controller
from scenarios.warehouse.env import WarehouseConfig, WarehouseEnv
from scenarios.warehouse.layout import MAPS_DIR, MAX_FIELD_CACHE_BYTES, build_layout, load_map


def _lazy(capacity: int):
    # A layout object (and its cache) is shared by key (map, dist_cache): tests use distinct sizes.
    return build_layout(load_map(MAPS_DIR / "large.map"), dist_cache=capacity)


def _bfs(layout, cell: int) -> np.ndarray:
    """Steps from ``cell`` to every cell by a plain Python BFS over ``layout.neighbours``."""
    dist = np.full(layout.n_cells, 1_000_000, dtype=np.int64)
    dist[cell] = 0
    frontier = [cell]
    while frontier:
        nxt = []
        for c in frontier:
            for nb in layout.neighbours[c, 1:].tolist():
                if dist[nb] > dist[c] + 1:
                    dist[nb] = dist[c] + 1
                    nxt.append(nb)
        frontier = nxt
    return dist


def test_fields_are_exact_and_the_cache_stays_within_its_bound() -> None:
    lazy = _lazy(7)
    assert lazy.dist is None and lazy.next_action is None and lazy.lazy
    fields = lazy.fields
    assert fields is not None
    start_misses = fields.misses
    targets = list(range(0, lazy.target_cells.size, 120))
    for t in targets:
        expected = _bfs(lazy, int(lazy.target_cells[t]))
        assert np.array_equal(lazy.field(t), expected), f"field of target {t} differs from a plain BFS"
        assert len(fields) <= 7
        assert fields.nbytes <= 7 * 4 * lazy.n_cells
    misses = fields.misses - start_misses
    assert misses == len(targets) and fields.evictions >= len(targets) - 7
    # Least recently used goes first: touching the oldest survivor keeps it through one more miss.
    kept = targets[-7]
    lazy.field(kept)
    lazy.field(1)
    assert int(lazy.target_cells[kept]) in fields and int(lazy.target_cells[targets[-6]]) not in fields
    with pytest.raises(ValueError):
        fields.get(int(lazy.target_cells[0]))[0] = 5  # cached fields are read-only


def test_lazy_env_steps_by_the_rules_and_its_exact_moves_follow_the_distances() -> None:
    env = WarehouseEnv(WarehouseConfig(map_file="large.map", n_robots=60, horizon=40, dist_cache=16))
    env.reset(seed=3)
    rng = np.random.default_rng(0)
    lay = env.layout
    delivered = 0
    for _ in range(40):
        valid = lay.action_valid[env.pos]
        act = np.argmax(rng.random(valid.shape) * valid, axis=1)
        env.step_array(act)
        assert lay.passable[env.pos].all() and np.unique(env.pos).size == env.n, "robots overlap or left the floor"
        assert (env.occupant[env.pos] == np.arange(env.n)).all()
        assert (env.task >= 0).all(), "the backlog keeps every robot busy"
        delivered = env.deliveries
    # The exact first moves: the first of up, down, left, right one step nearer the goal.
    moves = env.shortest_path_actions()
    goals = env.goal_cells()
    for i in range(0, env.n, 6):
        d = _bfs(lay, int(goals[i]))
        here = int(env.pos[i])
        nearer = [a for a in (1, 2, 3, 4) if d[lay.neighbours[here, a]] < d[here]]
        assert moves[i] == (nearer[0] if nearer else 0), f"robot {i}"
    assert delivered == env.episode_kpis()["deliveries"]
    assert len(lay.fields) <= 16


def test_lazy_observation_uses_manhattan_features() -> None:
    env = make_scenario("warehouse/xl", test=True)
    obs, infos = env.reset(seed=1)
    k = env._k
    lay = env.layout
    for i in range(0, env.n, 7):
        o = obs[f"robot_{i}"]
        goal = int(env.goal_cells()[i])
        (gr, gc), (r, c) = divmod(goal, lay.width), divmod(int(env.pos[i]), lay.width)
        assert o[2 * k + 2] == pytest.approx(min(1.0, (abs(gr - r) + abs(gc - c)) / (lay.height + lay.width - 2)))
        wanted = [a for a, ok in ((1, gr < r), (2, gr > r), (3, gc < c), (4, gc > c)) if ok]
        allowed = [a for a in wanted if lay.action_valid[env.pos[i], a]]
        hint = np.flatnonzero(o[2 * k + 5 :]) + 1
        assert hint.tolist() == allowed[:1], f"robot {i}: hint {hint} but Manhattan-lowering moves {allowed}"
        assert infos[f"robot_{i}"]["action_mask"].tolist() == lay.action_valid[env.pos[i]].astype(int).tolist()


def test_topology_matches_all_pairs() -> None:
    env = WarehouseEnv(WarehouseConfig(map_file="large.map", n_robots=150, comm_radius=4.0, dist_cache=4))
    env.reset(seed=2)
    rc = np.stack([env.pos // env.layout.width, env.pos % env.layout.width], axis=1).astype(float)
    d = np.sqrt(((rc[:, None] - rc[None]) ** 2).sum(-1))
    i, j = np.nonzero(np.triu(d <= 4.0, k=1))
    assert np.array_equal(env.topology_edges(), np.stack([i, j], axis=1))
    assert np.allclose(env.topology_distances(), d[i, j])


def test_full_xl_floor_steps_with_ten_thousand_robots() -> None:
    env = make_scenario("warehouse/xl", {"horizon": 3})
    assert env.n == 10_000 and env.layout.n_cells == 498 * 500 and env.layout.dist is None
    obs, _ = env.reset(seed=0)
    assert len(obs) == 10_000 and (env.task >= 0).all()
    rng = np.random.default_rng(0)
    for _ in range(3):
        act = rng.integers(0, 5, size=env.n)
        env.step(dict(zip(env.possible_agents, act.tolist())))
        assert np.unique(env.pos).size == env.n and env.layout.passable[env.pos].all()
    assert not env.agents, "the episode ends at the horizon"
    assert len(env.layout.fields) == 0, "random steps need no distance field"


def test_rolling_planner_delivers_more_than_random() -> None:
    results = {}
    for name in ("rolling", "random"):
        env = make_scenario("warehouse/xl", {"horizon": 150}, test=True)
        ctrl = build_controller(
            "warehouse/xl", name, env, {"budget_ms": 0, "max_plans": 20} if name == "rolling" else {}
        )
        obs, _ = env.reset(seed=5)
        ctrl.reset(env, 5)
        while env.agents:
            obs, *_ = env.step(ctrl.act(obs, env))
        results[name] = env.episode_kpis()
        if name == "rolling":
            assert ctrl.stats["planned"] > 0 and ctrl.stats["fallback"] > 0, ctrl.stats  # both paths ran
    assert results["rolling"]["deliveries"] > 3 * max(results["random"]["deliveries"], 1), results


SMALL = ["--set", "map_file=large.map", "--set", "n_robots=20", "--set", "horizon=5"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "dist_cache=0"], "bad dist_cache 0"),
        (["--set", "dist_cache=100000"], f"allowed: an integer 1..{MAX_FIELD_CACHE_BYTES // (4 * 498 * 500)}"),
        (["--controller-set", "budget_ms=-5", *SMALL], "bad budget_ms -5"),
        (["--controller-set", "window=0", *SMALL], "bad window 0"),
    ],
)
def test_bad_cache_and_planner_options_are_one_line(args, needle, tmp_path: Path, capsys) -> None:
    assert main(["run", "warehouse/xl", *args, "--episodes", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err


def test_dist_cache_is_checked_before_the_floor_is_built() -> None:
    with pytest.raises(ConfigError, match="bad dist_cache"):
        build_layout(load_map(MAPS_DIR / "small.map"), dist_cache=10**9)
    with pytest.raises(ConfigError, match="at most 62500"):  # dense tables: the small-floor limit holds
        make_scenario("warehouse/xl", {"dist_cache": None})


def test_bench_curve_rejects_bad_sizes(capsys) -> None:
    assert main(["bench", "warehouse", "warehouse/large", "--no-pogema", "--curve", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad --curve '10'" in err and "\n" not in err


def test_rolling_plans_every_robot_without_a_single_refused_move_when_unlimited() -> None:
    # budget 0, no plan cap, every field allowed: each robot holds a reserved space-time plan, so
    # the env's collision rule never has to hold anyone back.
    env = make_scenario("warehouse/xl", {"horizon": 80}, test=True)
    ctrl = build_controller("warehouse/xl", "rolling", env, {"budget_ms": 0, "max_plans": 0, "new_fields": 1000})
    obs, _ = env.reset(seed=4)
    ctrl.reset(env, 4)
    while env.agents:
        obs, *_ = env.step(ctrl.act(obs, env))
    kpis = env.episode_kpis()
    assert ctrl.stats["fallback"] == 0 and ctrl.stats["kept"] > ctrl.stats["planned"] > 0, ctrl.stats
    assert kpis["conflicts"] == 0 and kpis["deliveries"] > 0, kpis
