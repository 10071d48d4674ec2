"""Scale: generated SUMO grids (deterministic, cached, atomic) and ``marl bench scale`` on tiny sizes."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

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
