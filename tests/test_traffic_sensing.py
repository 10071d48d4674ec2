"""Local sensing of the traffic env (``--set sensing=local``): what a light sees, on real SUMO.

Under ``sensing=local`` a light's density and queue per incoming lane cover only the last
``sensing_m`` metres before its stop line. These tests recompute that from the simulator's own
vehicle positions, compare it with ``sensing=full`` on the same traffic, and check determinism
and the one-line errors. Episodes are cut to a few hundred simulated seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

from marl.cli import main
from marl.core import registry
from marl.core.errors import ConfigError
from scenarios.traffic.env import VEHICLE_SPACE_M, TrafficSignalEnv

END = 300  # s: queues have grown past 50 m of the 270-290 m lanes of grid4x4 by then


def make(**overrides: object) -> TrafficSignalEnv:
    return registry.make_scenario("traffic/grid4x4", {"end": END, **overrides})


def actions(env: TrafficSignalEnv, step: int) -> dict[str, int]:
    """A fixed, varied phase plan (the same in every run, so the traffic is the same)."""
    return {a: (step // 3 + i) % env.signals[a].n_phases for i, a in enumerate(env.agents)}


def play(env: TrafficSignalEnv, seed: int, probe: object = None) -> np.ndarray:
    """Observations [step, agent, value] of one episode under ``actions``; ``probe(env, obs)``
    is called at every decision."""
    rows = []
    obs, _ = env.reset(seed=seed)
    step = 0
    while True:
        rows.append(np.stack([obs[a] for a in env.possible_agents]))
        if probe is not None:
            probe(env, obs)  # type: ignore[operator]
        if not env.agents:
            break
        obs, *_ = env.step(actions(env, step))
        step += 1
        if not env.agents:
            rows.append(np.stack([obs[a] for a in env.possible_agents]))
            break
    return np.array(rows)


def test_local_observation_is_the_detector_range_of_each_lane() -> None:
    reach = 50.0
    env = make(sensing="local", sensing_m=reach)
    sim_counts: list[tuple[float, float, float, float]] = []

    def probe(env: TrafficSignalEnv, obs: dict[str, np.ndarray]) -> None:
        if not env.agents:
            return
        sim = env._sim  # the live simulation: positions straight from SUMO
        P = env.n_max_phases
        for agent in env.possible_agents:
            signal = env.signals[agent]
            whole = env.vehicles(signal.in_lanes)  # full counts (the controller API is unchanged)
            for j, lane in enumerate(signal.in_lanes):
                length = signal.lane_length[lane]
                far = sum(sim.vehicle.getLanePosition(v) < length - reach for v in sim.lane.getLastStepVehicleIDs(lane))
                seen = obs[agent][P + 1 + j] * max(min(length, reach) / VEHICLE_SPACE_M, 1.0)
                sim_counts.append((float(whole[j]), float(far), float(seen)))

    try:
        play(env, seed=4, probe=probe)
    finally:
        env.close()
    table = np.array(sim_counts)
    whole, far, seen = table.T
    cap = reach / VEHICLE_SPACE_M
    # what the light sees = vehicles on the lane less those beyond the range (density clipped at 1)
    np.testing.assert_allclose(seen, np.minimum(whole - far, cap), atol=1e-4)
    assert (far > 0).sum() > 50, "the episode never put vehicles beyond the range: the test proves nothing"
    assert (seen[far > 0] < whole[far > 0] - 0.5).all()  # the vehicles beyond are hidden
    nobody_beyond = (far == 0) & (whole <= cap)
    assert nobody_beyond.sum() > 50
    np.testing.assert_allclose(seen[nobody_beyond], whole[nobody_beyond], atol=1e-4)  # ... else all seen


def test_local_sees_a_subset_of_full_on_the_same_traffic() -> None:
    runs = {}
    for sensing in ("full", "local"):
        env = make(sensing=sensing)
        try:
            runs[sensing] = play(env, seed=2)
        finally:
            env.close()
    full, local = runs["full"], runs["local"]
    P, L = env.n_max_phases, env.n_max_lanes
    # phase one-hot and min-green flag: the same (same seed and actions: the same traffic)
    np.testing.assert_array_equal(full[..., : P + 1], local[..., : P + 1])
    # per lane, in vehicles: local <= full, equal on empty lanes, smaller somewhere
    caps_full = np.ones((len(env.possible_agents), L))
    caps_local = np.ones((len(env.possible_agents), L))
    for i, agent in enumerate(env.possible_agents):
        for j, lane in enumerate(env.signals[agent].in_lanes):
            length = env.signals[agent].lane_length[lane]
            caps_full[i, j] = max(length / VEHICLE_SPACE_M, 1.0)
            caps_local[i, j] = max(min(length, 50.0) / VEHICLE_SPACE_M, 1.0)
    for block in (slice(P + 1, P + 1 + L), slice(P + 1 + L, P + 1 + 2 * L)):
        n_full = np.rint(full[..., block] * caps_full)
        n_local = np.rint(local[..., block] * caps_local)
        assert (n_local <= n_full).all()
        assert (n_local < n_full).any()
        assert (n_local[n_full == 0] == 0).all()


def test_local_sensing_is_deterministic() -> None:
    env = make(sensing="local")
    try:
        first, second = play(env, seed=7), play(env, seed=7)
    finally:
        env.close()
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"sensing": "camera"}, "sensing: 'camera'; allowed: full, local"),
        ({"sensing_m": 0}, "bad sensing_m 0"),
        ({"sensing_m": -20}, "bad sensing_m -20"),
        ({"sensing_m": float("inf")}, "sensing_m"),
    ],
)
def test_bad_sensing_values_are_refused(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make(**overrides)


def test_bad_sensing_on_the_command_line_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "traffic/grid4x4", "--set", "sensing_m=-1"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "bad sensing_m -1" in lines[0], lines
