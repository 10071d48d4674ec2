"""Approaches (``--set approach_m=...``): short incoming lanes extended upstream, on real SUMO.

Ingolstadt's nets cut roads into short pieces just before their lights; a light that counts only
its controlled lanes is blind to the queue on the piece before. These tests check which lanes
join an approach (pure logic), that an extended lane's counts are the sum over its approach as
SUMO reports them lane by lane, and the one-line errors.
"""

from __future__ import annotations

import pytest

from marl.cli import main
from marl.core import registry
from marl.core.errors import ConfigError
from scenarios.traffic.env import VEHICLE_SPACE_M, TrafficSignalEnv
from scenarios.traffic.nets import approach_lanes, read_net


def test_short_lanes_take_their_feeders_until_the_approach_is_long_enough() -> None:
    # a (1 m) <- b (30 m) <- c (30 m) <- d (30 m); e (200 m) <- f; g (5 m) <- a's feeder b too
    feeds = {"a": ("b",), "b": ("c",), "c": ("d",), "e": ("f",), "g": ("b", "h")}
    length = {"a": 1.0, "b": 30.0, "c": 30.0, "d": 30.0, "e": 200.0, "f": 50.0, "g": 5.0, "h": 10.0}
    ext = approach_lanes(["a", "e", "g"], feeds, length, 50.0)
    # a: 1 + 30 + 30 >= 50 after two levels (d stays out); e is long already; g cannot take b
    # (a's already: no vehicle counted twice) and takes h only
    assert ext == [(0, "b"), (0, "c"), (2, "h")]
    assert approach_lanes(["a", "e", "g"], feeds, length, 0.0) == []
    # another light's incoming lane is never part of an approach
    assert approach_lanes(["a", "b"], feeds, length, 100.0) == [(1, "c"), (1, "d")]


def make(**overrides: object) -> TrafficSignalEnv:
    return registry.make_scenario("traffic/ingolstadt7", {"end": 57600 + 400, **overrides})


def test_an_extended_lane_counts_its_whole_approach() -> None:
    env = make(approach_m=100.0, control="program")  # the net's programme: the traffic is fixed
    checked = extended = 0
    try:
        env.reset(seed=3)
        sim = env._sim
        owner = {lane: env._in_lanes[k] for k, lane in zip(env._ext_owner, env._ext_lanes)}
        approach = {lane: [lane] + [x for x, o in owner.items() if o == lane] for lane in env._in_lanes}
        assert sum(len(v) > 1 for v in approach.values()) >= 20  # most of ingolstadt7's lanes are short
        while env.agents:
            env.step(dict.fromkeys(env.agents, 0))
            if not env.agents:
                break
            for agent in env.possible_agents:
                lanes = env.signals[agent].in_lanes
                counts, halting = env.vehicles(lanes), env.halting(lanes)
                for j, lane in enumerate(lanes):
                    whole = approach[lane]
                    assert counts[j] == sum(sim.lane.getLastStepVehicleNumber(x) for x in whole)
                    assert halting[j] == sum(sim.lane.getLastStepHaltingNumber(x) for x in whole)
                    checked += 1
                    extended += len(whole) > 1 and counts[j] > sim.lane.getLastStepVehicleNumber(lane)
        # the capacity behind the density is the approach's length
        agent = env.possible_agents[0]
        lane = env.signals[agent].in_lanes[0]
        metres = sum(read_net(str(env._net_path)).lane_length[x] for x in approach[lane])
        j = env._in_lanes.index(lane)
        assert env._capacity[j] == pytest.approx(max(metres / VEHICLE_SPACE_M, 1.0))
    finally:
        env.close()
    assert checked > 500
    assert extended > 0, "no vehicle ever stood upstream of a short lane: the test proves nothing"


def test_approach_m_zero_leaves_the_lanes_alone() -> None:
    env = make(approach_m=0.0)
    try:
        assert env._ext_lanes == ()
    finally:
        env.close()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"approach_m": -5}, "bad approach_m -5"),
        ({"approach_m": float("inf")}, "approach_m: .inf.; expected a finite number"),
        ({"approach_m": "far"}, "approach_m"),
        ({"sensing": "local"}, "bad approach_m 100.0 with sensing=local"),
    ],
)
def test_bad_approach_values_are_refused(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make(**overrides)


def test_bad_approach_on_the_command_line_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "traffic/ingolstadt7", "--set", "approach_m=-1"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "bad approach_m -1" in lines[0], lines
