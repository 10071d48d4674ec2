"""Later simulations run in libsumo in forked children of a clean zygote (``scenarios/traffic/forked.py``).

A process's first libsumo simulation is reproducible, later ones are not (see
``test_traffic_determinism.py``); so every later one runs in a child forked from a process that
imported libsumo but never simulated, and the env talks to it with one round trip per decision.
These tests force that path (as if the process's first simulation had run) and require the
same observations, rewards and KPIs as a fresh sumo process over TraCI; a child that dies must
become a one-line SimulatorError, not a hang. ~15 s.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

import scenarios.traffic.env as traffic_env
from marl.core import registry
from marl.core.errors import ConfigError, SimulatorError
from marl.episodes import run_episode
from marl.runner import build_controller
from scenarios.traffic import forked

pytest.importorskip("libsumo")
pytestmark = pytest.mark.skipif(not forked.available(), reason="needs fork and socket.send_fds")


@pytest.fixture
def later(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if this process had run its first libsumo simulation: every libsumo one is forked."""
    monkeypatch.setattr(traffic_env, "_LIBSUMO_SPENT", True)


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _trace(scenario: str, sets: dict[str, object], seed: int) -> tuple[list[np.ndarray], list[float], dict]:
    """States and rewards at every decision of one episode under a fixed varied phase plan,
    reading the out lanes too (the controller API), and the KPIs."""
    env = registry.make_scenario(scenario, sets)
    states, rewards = [], []
    try:
        env.reset(seed=seed)
        assert env._forked == (sets.get("use_libsumo", True) is not False)
        step = 0
        while env.agents:
            states.append(env.state())
            agent = env.possible_agents[step % len(env.possible_agents)]
            states.append(env.halting(env.signals[agent].out_lanes))
            acts = {a: (step // 3 + i) % env.signals[a].n_phases for i, a in enumerate(env.agents)}
            _, rew, *_ = env.step(acts)
            rewards.extend(rew.values())
            step += 1
        return states, rewards, env.episode_kpis()
    finally:
        env.close()


@pytest.mark.parametrize(
    ("scenario", "sets"),
    [
        ("traffic/grid4x4", {"end": 400, "sensing": "local", "reward": "pressure"}),
        ("traffic/ingolstadt7", {"end": 57600 + 300, "approach_m": 100.0, "reward": "diff-waiting-time"}),
    ],
)
def test_forked_episode_equals_a_fresh_sumo_process_decision_by_decision(
    later: None, scenario: str, sets: dict[str, object]
) -> None:
    states, rewards, kpis = _trace(scenario, sets, seed=5)
    ref_states, ref_rewards, ref_kpis = _trace(scenario, {**sets, "use_libsumo": False}, seed=5)
    assert len(states) == len(ref_states) > 20
    for got, want in zip(states, ref_states):
        np.testing.assert_array_equal(got, want)
    assert rewards == ref_rewards
    assert kpis == ref_kpis
    assert any(r != 0.0 for r in rewards), "no traffic: the comparison proves nothing"


def test_later_episodes_run_in_forked_children_and_match_traci(later: None) -> None:
    scenario = "traffic/cologne1"
    env = registry.make_scenario(scenario, {})
    children: set[tuple[int, int]] = set()

    def where(_: int) -> None:
        sim = env._sim
        if sim is not None:  # after the last step the episode's simulation is closed
            assert isinstance(sim, forked.ForkedSimulation)
            children.add((sim.pid, _parent_of(sim.pid)))

    try:
        got = [run_episode(env, build_controller(scenario, "max-wave", env), seed=s, on_step=where) for s in (1, 2)]
    finally:
        env.close()
    reference = registry.make_scenario(scenario, {"use_libsumo": False})
    try:
        want = [run_episode(reference, build_controller(scenario, "max-wave", reference), seed=s) for s in (1, 2)]
    finally:
        reference.close()
    assert got == want
    zygote = forked.zygote()
    # one child per episode, each forked by this process's zygote (not by this process)
    assert len({pid for pid, _ in children}) == 2 and {ppid for _, ppid in children} == {zygote.proc.pid}


def test_a_killed_child_is_a_one_line_simulator_error_and_reset_recovers(later: None) -> None:
    env = registry.make_scenario("traffic/grid4x4", {"end": 100})
    try:
        env.reset(seed=1)
        os.kill(env._sim.pid, signal.SIGKILL)
        with pytest.raises(SimulatorError) as info:
            env.step(dict.fromkeys(env.agents, 1))
        text = str(info.value)
        assert "\n" not in text and "exited" in text and "reset()" in text
        env.reset(seed=1)  # a new child
        while env.agents:
            env.step(dict.fromkeys(env.agents, 1))
        assert env.episode_kpis()["trips"] > 0
    finally:
        env.close()


def test_shutdown_ends_the_zygote_and_its_children(later: None) -> None:
    env = registry.make_scenario("traffic/grid4x4", {"end": 100})
    try:
        env.reset(seed=1)
        child, zygote = env._sim.pid, forked.zygote()
        forked.shutdown()  # what interpreter exit runs, mid-episode
        assert zygote.proc.returncode is not None  # reaped: no zombie
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)  # the zygote waited for its child before leaving: no orphan
        with pytest.raises(SimulatorError, match="shutting"):
            env.step(dict.fromkeys(env.agents, 1))
    finally:
        env.close()


def test_files_sumo_rejects_in_a_child_are_the_in_process_errors(later: None, tmp_path: Path) -> None:
    route = tmp_path / "bad.rou.xml"
    route.write_text("not a route file\n")
    unknown_edge = tmp_path / "edge.rou.xml"
    unknown_edge.write_text('<routes><vehicle id="v" depart="0"><route edges="no_such_edge"/></vehicle></routes>\n')
    errors = []
    for path in (route, unknown_edge):
        env = registry.make_scenario("traffic/grid4x4", {"end": 100, "route_file": str(path)})
        try:
            with pytest.raises((ConfigError, SimulatorError)) as info:
                env.reset(seed=1)
        finally:
            env.close()
        errors.append(info.value)
    # libsumo's own words, as in-process: the broken file is named, an unknown edge is SUMO's text
    assert isinstance(errors[0], ConfigError) and "\n" not in str(errors[0])
    assert str(errors[0]).startswith(f"bad route_file '{route}': SUMO rejected it") and "invalid document" in str(
        errors[0]
    )
    assert type(errors[1]) is SimulatorError and "\n" not in str(errors[1])
    assert "'no_such_edge' within the route for vehicle 'v' is not known" in str(errors[1])


def test_without_fork_later_episodes_run_in_a_sumo_process(later: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where fork or socket.send_fds is missing (Windows), later episodes use TraCI's fresh sumo."""
    monkeypatch.setattr(forked, "available", lambda: False)
    kpis = []
    for sets in ({}, {"use_libsumo": False}):
        env = registry.make_scenario("traffic/grid4x4", {"end": 200, **sets})
        try:
            env.reset(seed=2)
            assert not env._forked and not env._libsumo
            while env.agents:
                env.step(dict.fromkeys(env.agents, 1))
            kpis.append(env.episode_kpis())
        finally:
            env.close()
    assert kpis[0] == kpis[1] and kpis[0]["trips"] > 0
