"""Rule-based protocols and the runtime that marl run builds from --protocol/--channel."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from comms.channel import Channel, ChannelSpec
from comms.runtime import build_comms
from marl.core import registry
from marl.core.errors import ConfigError, UnknownNameError

IDS = [f"a{i}" for i in range(6)]
RING = nx.cycle_graph(IDS)


def payloads(p: int = 3) -> dict[str, np.ndarray]:
    return {a: np.arange(p, dtype=float) + 10 * i for i, a in enumerate(IDS)}


def test_registry_has_rule_based_and_learned_protocols():
    table = registry.protocols()
    for name in ("none", "neighbours", "broadcast", "gossip", "consensus"):
        assert not table[name].learned
        cls = registry.load(table[name].entry_point)
        assert cls().output_size(4) in (0, 4, 9)
    for name, entry in [
        ("commnet", "comms.protocols.commnet:CommNet"),
        ("tarmac", "comms.protocols.tarmac:TarMAC"),
        ("ic3net", "comms.protocols.ic3net:IC3NetGate"),
    ]:
        assert table[name].learned and table[name].entry_point == entry


@pytest.mark.parametrize(
    "name,size", [("none", 0), ("neighbours", 7), ("broadcast", 7), ("gossip", 7), ("consensus", 3)]
)
def test_output_sizes_are_fixed(name, size):
    comms = build_comms(name, "drop=0.5", IDS, 3, seed=0)
    comms.reset(RING)
    for _ in range(4):
        out = comms.exchange(payloads(), RING)
        assert set(out) == set(IDS)
        assert all(v.shape == (size,) for v in out.values())


def test_neighbours_gives_mean_max_count_of_neighbours():
    comms = build_comms("neighbours", "", IDS, 3, seed=0)
    comms.reset(RING)
    out = comms.exchange(payloads(), RING)
    # a0's neighbours on the ring are a1 (10..12) and a5 (50..52)
    assert out["a0"].tolist() == [30, 31, 32, 50, 51, 52, 2]
    missing = comms.exchange({a: v for a, v in payloads().items() if a != "a1"}, RING)
    assert missing["a0"].tolist() == [50, 51, 52, 50, 51, 52, 1]


def test_broadcast_and_gossip_message_counts():
    comms = build_comms("broadcast", "", IDS, 2, seed=0)
    comms.reset(nx.empty_graph(IDS))
    out = comms.exchange(payloads(2), nx.empty_graph(IDS))
    assert out["a0"][-1] == 5 and comms.stats()["messages_sent"] == 30
    gossip = build_comms("gossip", "", IDS, 2, seed=0)
    gossip.reset(RING)
    for _ in range(10):
        out = gossip.exchange(payloads(2), RING)
    s = gossip.stats()
    assert s["messages_sent"] == 60 and s["messages_delivered"] == 60
    received = sum(v[-1] for v in out.values())
    assert received == 6


def test_consensus_protocol_estimates_the_average():
    comms = build_comms("consensus", "", IDS, 3, seed=0)
    comms.reset(RING)
    x = payloads()
    for _ in range(30):  # 3 rounds each; the estimate restarts from the payload each step
        out = comms.exchange(x, RING)
    mean = np.mean(list(x.values()), axis=0)
    spread = np.abs(np.array(list(x.values())) - mean).max()
    assert np.abs(out["a0"] - mean).max() < 0.8 * spread


def test_stats_are_episode_totals_and_reset():
    comms = build_comms("neighbours", "bits=8,drop=0.2", IDS, 4, seed=1)
    comms.reset(RING)
    for _ in range(5):
        comms.exchange(payloads(4), RING)
    s = comms.stats()
    per_message = 8 + 8 + 4  # header + scale + 4 values of 8 bits
    assert s["messages_sent"] == 5 * 12
    assert s["bytes_sent"] == 5 * 12 * per_message
    assert s["bytes_per_agent_step"] == 12 * per_message / 6
    assert 0 < s["delivery_rate"] < 1
    comms.reset(RING)
    assert comms.stats()["messages_sent"] == 0


def test_bad_protocols():
    with pytest.raises(ConfigError, match="protocol tarmac is learned; use marl train"):
        build_comms("tarmac", "", IDS, 3, seed=0)
    with pytest.raises(UnknownNameError, match="did you mean 'gossip'"):
        build_comms("gosip", "", IDS, 3, seed=0)
    with pytest.raises(UnknownNameError, match="'a9'"):
        build_comms("neighbours", "crash=a9", IDS, 3, seed=0)


def test_delivery_mask_accounting_for_learned_protocols():
    ch = Channel(IDS, ChannelSpec(crash=("a2",)), RING)
    mask = ch.delivery_mask(payload_size=4)
    assert mask.sum() == 12 - 4 and not mask[2].any() and not mask[:, 2].any()
    assert ch.totals()["messages_sent"] == 10


# -- through the CLI on SUMO (each run in its own process: libsumo allows one simulation) ------

SHORT = ["--set", "end=300"]  # 30 decisions of 10 s on grid4x4


def marl_run(tmp_path, *args: str):
    import subprocess
    import sys
    from pathlib import Path

    from marl.results.records import read_records

    marl = Path(sys.executable).parent / "marl"
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(marl), "run", "traffic/grid4x4", *args, *SHORT, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    frame = read_records(out)
    return {row.metric: row.value for row in frame.itertuples()}


def test_cli_coordinated_max_pressure_records_channel_stats(tmp_path):
    from comms.channel import message_bytes

    kpis = marl_run(
        tmp_path,
        "--controller",
        "max-pressure-coordinated",
        "--protocol",
        "neighbours",
        "--channel",
        "drop=0.2",
    )
    assert {"bytes_per_agent_step", "delivery_rate", "delay"} <= set(kpis)
    assert 0.7 < kpis["delivery_rate"] < 0.9  # 1440 messages at 20% loss
    steps, sent = kpis["env_steps"], kpis["messages_sent"]
    assert sent % steps == 0  # the same links every step
    # payload: one slot per internal lane = 16 lights x 12 incoming lanes - 48 border lanes
    assert kpis["bytes_sent"] / sent == message_bytes(16 * 12 - 48, 32)
    assert kpis["bytes_per_agent_step"] == kpis["bytes_sent"] / (16 * steps)


def test_cli_coordinated_equals_max_pressure_on_a_perfect_channel(tmp_path):
    plain = marl_run(tmp_path / "a", "--controller", "max-pressure")
    talk = marl_run(tmp_path / "b", "--controller", "max-pressure-coordinated", "--protocol", "neighbours")
    for kpi in ("delay", "waiting_time", "throughput", "queue"):
        assert talk[kpi] == plain[kpi]
    assert talk["delivery_rate"] == 1.0


class _FakeTrafficEnv:
    """Pure-logic stand-in for the traffic env's controller API (two lights, no SUMO).

    Light A: incoming lanes w, n; outgoing ab (= B's incoming lane) and exit x.
    Phase 0 gives w -> ab green, phase 1 gives n -> x green.
    """

    control = "agents"

    def set_control(self, mode: str) -> None:
        self.control = mode

    def __init__(self) -> None:
        from scenarios.traffic.nets import Signal

        def signal(name, ins, outs, links, phase_links):
            return Signal(
                id=name,
                phases=["G" * len(links)] * len(phase_links),
                program=[],
                links=links,
                in_lanes=ins,
                out_lanes=outs,
                link_in=np.array([ins.index(a) for a, _ in links]),
                link_out=np.array([outs.index(b) for _, b in links]),
                phase_links=np.array(phase_links, dtype=bool),
                lane_length={},
            )

        self.signals = {
            "A": signal("A", ["w", "n"], ["ab", "x"], [("w", "ab"), ("n", "x")], [[1, 0], [0, 1]]),
            "B": signal("B", ["ab"], ["y"], [("ab", "y")], [[1]]),
        }
        self.possible_agents = self.agents = ["A", "B"]
        self.topology = nx.Graph([("A", "B")])
        self.load = {"w": 5.0, "n": 4.0, "ab": 10.0, "x": 0.0, "y": 0.0}

    def vehicles(self, lanes):
        return np.array([self.load[lane] for lane in lanes])

    halting = vehicles

    def current_phase(self, agent):
        return 0


def test_coordinated_max_pressure_uses_messages_then_falls_back():
    from scenarios.traffic.coordinated import CoordinatedMaxPressure

    env = _FakeTrafficEnv()
    ctl = CoordinatedMaxPressure(env, CoordinatedMaxPressure.Config(max_age=2))
    assert ctl.payload_size == 1  # one internal lane: ab
    comms = build_comms("neighbours", "", env.agents, ctl.payload_size, seed=0)
    comms.reset(env.topology)
    step = lambda payloads: ctl.act({}, env, comms.exchange(payloads, env.topology))
    # B reports ab = 10: pressure(0) = 5 - 10 < pressure(1) = 4 - 0 -> phase 1.
    assert step(ctl.payload({}, env))["A"] == 1
    # B falls silent: the last report is used for max_age decisions, then ab counts as empty.
    silent = {"A": ctl.payload({}, env)["A"]}
    assert [step(silent)["A"] for _ in range(3)] == [1, 1, 0]
    # Without any protocol the coordinated controller never learns ab's load.
    ctl.reset(env)
    assert ctl.act({}, env, None)["A"] == 0
    assert ctl.missing == 1 and ctl.heard == 0
