"""Episodes are reproducible however many simulations ran before them in the process.

SUMO's traffic depends on where its objects lie in memory. A libsumo simulation after the first
one in a process reuses the heap holes left by earlier ones, so its jams and teleports varied
with the heap's history (address-space randomisation, the machine's load, anything else the
process allocated): on cologne1 the third episode came out as 42.63 s, 22.63 s or 21.30 s of delay
from run to run. The env therefore runs only a process's first simulation in its own libsumo and
every later one in libsumo in a child forked from a clean zygote process (one that imported libsumo
but never simulated; ``scenarios/traffic/forked.py``), so each is a process's first simulation.

The test reproduces the heap's history on purpose: between episodes it allocates and keeps
blocks of varied sizes (as a learner or a logger would), then requires every episode to equal the
same episode in a fresh sumo process. On the old code (every episode in libsumo) it failed in 7
runs of 7 (in trials each run had 2 to 4 of its 8 perturbed episodes off); ~10 s.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from marl.core import registry
from marl.episodes import run_episode
from marl.runner import build_controller
from scenarios.traffic import forked

pytest.importorskip("libsumo")

SCENARIO = "traffic/cologne1"
#: episode_seeds(1, 3) of a cologne1 run: the third episode is the one whose traffic jams (its
#: delay is most sensitive to the order of events), the first spends the process's fresh heap.
FIRST, SENSITIVE = 1, 798405205


def _kpis(env: object, seed: int) -> dict[str, float]:
    return run_episode(env, build_controller(SCENARIO, "max-wave", env), seed=seed)


def _perturb_heap(rng: random.Random, keep: list[bytearray]) -> None:
    """Allocate blocks of varied sizes and keep about half, then drop a third of those kept:
    the holes and the order of the heap change, as anything else the process did would."""
    for _ in range(rng.randrange(200, 2000)):
        block = bytearray(rng.choice([24, 40, 64, 100, 600, 1000, 2000, 5000]))
        if rng.random() < 0.5:
            keep.append(block)
    rng.shuffle(keep)
    del keep[: len(keep) // 3]


def test_later_libsumo_episodes_equal_a_fresh_sumo_process() -> None:
    reference_env = registry.make_scenario(SCENARIO, {"use_libsumo": False})
    try:
        first_reference = _kpis(reference_env, FIRST)
        reference = _kpis(reference_env, SENSITIVE)
    finally:
        reference_env.close()

    env = registry.make_scenario(SCENARIO, {})
    keep: list[bytearray] = []
    try:
        first = _kpis(env, FIRST)
        got = []
        for k in range(8):
            _perturb_heap(random.Random(k), keep)
            got.append(_kpis(env, SENSITIVE))
            assert env._forked or not forked.available(), "later episodes run in forked children"
    finally:
        env.close()
    assert first == first_reference, "the process's first episode (libsumo when fresh) equals a sumo process's"
    for kpis in got:
        assert kpis == reference, f"delay {kpis['delay']:.3f} s vs {reference['delay']:.3f} s in a fresh process"


def test_sumo_tools_are_found_when_libsumo_set_sumo_home_to_its_data_wheel(tmp_path, monkeypatch) -> None:
    """Importing libsumo points SUMO_HOME at the sumo-data wheel (data files, no bin/ or tools/):
    the fresh-sumo episodes and the generated grids (netgenerate, randomTrips.py) still need
    SUMO's executables, which the eclipse-sumo wheel has."""
    from scenarios.traffic.nets import sumo_binary, sumo_home

    data_only = tmp_path / "sumo_data"
    (data_only / "data").mkdir(parents=True)
    monkeypatch.setenv("SUMO_HOME", str(data_only))
    home = Path(sumo_home())
    assert home != data_only and (home / "bin").is_dir() and (home / "tools" / "randomTrips.py").is_file()
    assert Path(sumo_binary()).is_file()
