"""Scale: generated SUMO grids (deterministic, cached, atomic) and ``marl bench scale`` on tiny sizes."""

from __future__ import annotations

import json
import math
import re
import threading
from pathlib import Path

import pytest

from marl.cli import main
from marl.core.errors import ConfigError
from scenarios.traffic.nets import GridRecipe, build_grid, grid_dir, parse_generated, read_net, resolve_path


def _body(path: Path) -> str:
    """A SUMO output file without its header comments (they hold the date and the tool options)."""
    return re.sub(r"<!--.*?-->", "", path.read_text(), flags=re.S)


def test_grid_is_deterministic_per_seed_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = GridRecipe(2, 3, seed=4, veh_per_light_hour=60, hours=0.1)
    a = build_grid(recipe, tmp_path / "a")
    b = build_grid(recipe, tmp_path / "b")
    for name in ("grid.net.xml", "grid.rou.xml"):
        assert _body(a / name) == _body(b / name), f"{name} differs between two builds of one recipe"
    signals = read_net(str(a / "grid.net.xml")).signals
    assert len(signals) == 6, f"a 2x3 grid has 6 lights, read {sorted(signals)}"
    other = build_grid(GridRecipe(2, 3, seed=5, veh_per_light_hour=60, hours=0.1), tmp_path / "a")
    assert _body(other / "grid.rou.xml") != _body(a / "grid.rou.xml"), "the seed must change the demand"
    assert _body(other / "grid.net.xml") == _body(a / "grid.net.xml"), "the net does not depend on the seed"

    # Cached: a second call must not run any tool.
    def no_tools(*args: object, **kwargs: object) -> None:
        raise AssertionError("build_grid ran a tool although the net is cached")

    monkeypatch.setattr("scenarios.traffic.nets.subprocess.run", no_tools)
    assert build_grid(recipe, tmp_path / "a") == a


def test_concurrent_builds_leave_one_complete_directory(tmp_path: Path) -> None:
    recipe = GridRecipe(2, 2, seed=1, hours=0.05)
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(build_grid(recipe, tmp_path))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    final = grid_dir(recipe, tmp_path)
    assert results == [final, final]
    assert sorted(p.name for p in final.iterdir()) == ["grid.net.xml", "grid.rou.xml", "recipe.json"]
    assert [p.name for p in final.parent.iterdir()] == [final.name], "a temporary build directory was left behind"


def test_generated_paths_resolve_through_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONCORD_CACHE_DIR", str(tmp_path))
    net = resolve_path("generated/grid2x2-seed0/grid.net.xml", "net_file")
    assert net == grid_dir(GridRecipe(2, 2, 0), tmp_path) / "grid.net.xml" and net.is_file()
    assert parse_generated("generated/grid10x20-seed7/grid.rou.xml") == (GridRecipe(10, 20, 7), "grid.rou.xml")
    for bad in ("generated/grid10x10/grid.net.xml", "generated/grid1x5-seed0/grid.net.xml",
                "generated/grid3x3-seed0/other.xml"):  # fmt: skip
        with pytest.raises(ConfigError, match="bad net_file"):
            resolve_path(bad, "net_file")


# ----------------------------------------------------------------------------- marl bench scale
def test_loglog_slope_recovers_the_exponent() -> None:
    from marl.bench.scale import loglog_slope

    agents = [10, 100, 1000]
    assert loglog_slope(agents, [3.0 * n**1.5 for n in agents]) == pytest.approx(1.5)
    assert loglog_slope(agents, [7.0 * n for n in agents]) == pytest.approx(1.0)
    assert math.isnan(loglog_slope([10, 10], [1.0, 2.0])), "one distinct size has no slope"


def test_bench_scale_comms_tiny_writes_table_slopes_and_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from marl.bench.scale import loglog_slope

    rc = main(["bench", "scale", "comms", "--sizes", "8,16,32", "--reps", "3", "--rollout", "4",
               "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    doc = json.loads((tmp_path / "scale_comms.json").read_text())
    rows = doc["rows"]
    assert [r["agents"] for r in rows] == [8, 16, 32]
    for col in ("comms", "policy", "update"):
        assert all(r[col] > 0 for r in rows), col
        expected = loglog_slope([r["agents"] for r in rows], [r[col] * r["agents"] for r in rows])
        assert doc["slopes"][col] == pytest.approx(expected)
    assert all(r["msg/s"] > 0 for r in rows), "the channel delivered nothing"
    assert (tmp_path / "scale_comms.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "slope" in out and f"{doc['slopes']['env+comms']:.2f}" in out


def test_bench_scale_traffic_tiny_times_env_and_raw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from marl.bench.scale import measure, parse_sizes, slopes

    monkeypatch.setenv("CONCORD_CACHE_DIR", str(tmp_path))
    rows = measure("traffic", parse_sizes("traffic", "2x2,3x3"), steps=2, warmup=1, reps=2, rollout=4)
    assert [r["agents"] for r in rows] == [4, 9]
    for r in rows:
        assert r["env"] > 0 and r["raw"] > 0 and r["env/raw"] == pytest.approx(r["env"] / r["raw"])
        assert r["veh/light"] >= 0 and r["degree"] > 0
    assert math.isfinite(slopes(rows)["env+comms"])


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["nosuch"], "unknown scale domain 'nosuch'"),
        (["comms", "--sizes", "100"], "bad --sizes '100'"),
        (["traffic", "--sizes", "4by4,5x5"], "bad traffic size '4by4'"),
        (["warehouse", "--sizes", "small,huge"], "unknown warehouse map 'huge'"),
        (["comms", "--steps", "0"], "bad --steps 0"),
        (["grid", "--sizes", "ieee33,1-MV-nowhere"], "unknown grid size (scenario or SimBench feeder) '1-MV-nowhere'"),
    ],
)
def test_bench_scale_bad_input_is_one_line(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "scale", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err


def test_ring_allreduce_model() -> None:
    from marl.bench.scaling import ring_allreduce_seconds

    # 64 ranks, 1 MB at 1 GB/s and 10 us: 2*63/64 ms of bandwidth + 126 * 10 us of latency.
    assert ring_allreduce_seconds(1e6, 64, 1e9, 1e-5) == pytest.approx(2 * 63 / 64 * 1e-3 + 126e-5)
    assert ring_allreduce_seconds(1e6, 1, 1e9, 1e-5) == 0.0, "one rank sends nothing"


def test_default_warehouse_sizes_reach_ten_thousand_robots() -> None:
    from marl.bench.scale import default_sizes, parse_sizes
    from marl.core import registry

    sizes = parse_sizes("warehouse", default_sizes("warehouse"))
    robots = [s.overrides.get("n_robots", registry.scenario_spec(s.scenario).kwargs["n_robots"]) for s in sizes]
    assert len(sizes) >= 5 and robots == sorted(robots) and robots[-1] == 10_000, robots
