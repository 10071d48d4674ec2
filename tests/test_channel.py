"""Channel: topology, crashes, loss statistics, delay, byte accounting, quantisation, parsing."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comms.channel import (
    HEADER_BYTES,
    SCALE_BYTES,
    Channel,
    ChannelSpec,
    message_bytes,
    parse_channel,
    quantisation_bound,
    quantise,
    send_neighbours_loop,
)
from marl.core.errors import ConfigError, UnknownNameError


def agents(n: int) -> list[str]:
    return [f"a{i}" for i in range(n)]


def graph(n: int, p: float, seed: int) -> nx.Graph:
    g = nx.gnp_random_graph(n, p, seed=seed)
    return nx.relabel_nodes(g, {i: f"a{i}" for i in range(n)})


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 12),
    p=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
    crash=st.integers(0, 3),
    mode=st.sampled_from(["neighbours", "send", "gossip"]),
)
def test_never_delivers_along_missing_link_or_to_from_crashed(n, p, seed, crash, mode):
    g = graph(n, p, seed)
    ch = Channel(agents(n), ChannelSpec(crash=min(crash, n), seed=seed), g)
    rng = np.random.default_rng(seed)
    payload = rng.random((n, 3))
    for _ in range(3):
        if mode == "neighbours":
            d = ch.send_neighbours(payload)
        else:  # arbitrary pairs, most of them not links
            src = rng.integers(0, n, 40)
            dst = rng.integers(0, n, 40)
            d = ch.send(src, dst, rng.random((40, 3)))
        for s, t in zip(d.src, d.dst):
            assert g.has_edge(f"a{s}", f"a{t}")
            assert not ch.crashed[s] and not ch.crashed[t]


def test_broadcast_ignores_topology_but_not_crashes():
    n = 6
    ch = Channel(agents(n), ChannelSpec(crash=("a2",)), nx.empty_graph(agents(n)))
    d = ch.send_broadcast(np.ones((n, 2)))
    assert len(d) == 4 * 5 - 0  # 5 live senders x 4 live receivers
    assert 2 not in d.src and 2 not in d.dst
    assert ch.send_neighbours(np.ones((n, 2))).src.size == 0  # no links at all


def test_delivery_rate_matches_drop_and_counts_add_up():
    n, drop = 200, 0.3
    g = nx.relabel_nodes(nx.random_regular_graph(4, n, seed=1), {i: f"a{i}" for i in range(n)})
    ch = Channel(agents(n), ChannelSpec(drop=drop, seed=5), g)
    for _ in range(20):
        ch.send_neighbours(np.zeros((n, 4)))
    t = ch.totals()
    assert t["messages_sent"] == 20 * 4 * n
    assert t["messages_delivered"] + t["messages_dropped"] == t["messages_sent"]
    # 16000 Bernoulli trials: sd of the rate is 0.0036; 0.03 is > 8 sd.
    assert abs(t["delivery_rate"] - (1 - drop)) < 0.03


@pytest.mark.parametrize("bits", [32, 16, 8, 1])
@pytest.mark.parametrize("p", [0, 1, 5, 16])
def test_byte_counts_exact(bits, p):
    n = 5
    g = nx.path_graph(agents(n))  # 4 links -> 8 directed messages per step
    ch = Channel(agents(n), ChannelSpec(bits=bits), g)
    for _ in range(3):
        ch.send_neighbours(np.ones((n, p)))
    expected = HEADER_BYTES + (SCALE_BYTES if bits < 32 and p else 0) + math.ceil(p * bits / 8)
    assert message_bytes(p, bits) == expected
    t = ch.totals()
    assert t["bytes_sent"] == 3 * 8 * expected
    assert t["bytes_delivered"] == 3 * 8 * expected
    assert ch.counters.sent_bytes.tolist() == [3 * d * expected for d in (1, 2, 2, 2, 1)]


def test_budget_caps_bytes_per_agent_step():
    n = 5
    size = message_bytes(4, 32)
    ch = Channel(agents(n), ChannelSpec(budget=2 * size), nx.complete_graph(agents(n)))
    ch.send_neighbours(np.ones((n, 4)))  # each agent wants 4 messages, may send 2
    assert ch.counters.sent_msgs.tolist() == [2] * n
    assert ch.counters.over_budget_msgs.tolist() == [2] * n
    assert ch.counters.sent_bytes.max() <= 2 * size


@pytest.mark.parametrize("delay", [0, 1, 3])
def test_delay_exact(delay):
    n = 3
    ch = Channel(agents(n), ChannelSpec(delay=delay), nx.complete_graph(agents(n)))
    arrivals = []
    for t in range(8):
        d = ch.send_neighbours(np.full((n, 1), float(t)))
        arrivals.append(sorted(set(d.payload[:, 0].tolist())))
    for t in range(8):
        assert arrivals[t] == ([float(t - delay)] if t >= delay else [])


def test_crash_at_runtime_drops_messages_in_flight():
    n = 3
    ch = Channel(agents(n), ChannelSpec(delay=1), nx.complete_graph(agents(n)))
    ch.send_neighbours(np.ones((n, 1)))
    ch.crash(["a1"])
    d = ch.idle(1)
    assert len(d) == 6 - 2  # messages to a1 die with it; a1's own were already in flight
    assert 1 not in d.dst


def test_topology_change_is_read_each_step_and_edge_array_accepted():
    n = 4
    ch = Channel(agents(n), ChannelSpec(), nx.path_graph(agents(n)))
    assert len(ch.send_neighbours(np.ones((n, 1)))) == 6
    ch.set_topology(nx.complete_graph(agents(n)))
    assert len(ch.send_neighbours(np.ones((n, 1)))) == 12
    ch.set_topology(np.array([[0, 3]]))
    d = ch.send_neighbours(np.ones((n, 1)))
    assert sorted(zip(d.src.tolist(), d.dst.tolist())) == [(0, 3), (3, 0)]


def test_delivery_mask_follows_topology_and_loss():
    n = 50
    g = graph(n, 0.2, 3)
    ch = Channel(agents(n), ChannelSpec(drop=0.5, seed=1), g)
    mask = ch.delivery_mask(8)
    adj = nx.to_numpy_array(g, nodelist=agents(n)).astype(bool)
    assert not (mask & ~adj).any()
    assert 0.35 < mask.sum() / adj.sum() < 0.65


@settings(max_examples=40, deadline=None)
@given(
    x=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=20),
    bits=st.sampled_from([32, 16, 8, 1]),
)
def test_quantisation_error_within_bound(x, bits):
    row = np.array([x])
    err = np.abs(quantise(row, bits) - row).max()
    assert err <= quantisation_bound(row, bits)[0] * (1 + 1e-9) + 1e-9


def test_receiver_sees_quantised_payload():
    ch = Channel(agents(2), ChannelSpec(bits=1), nx.complete_graph(agents(2)))
    d = ch.send_neighbours(np.array([[0.0, 0.3, 1.0], [2.0, 2.0, 2.0]]))
    got = d.payload[d.src == 0][0]
    assert got.tolist() == [0.0, 0.0, 1.0]


def test_parse_channel_good_and_bad():
    spec = parse_channel("drop=0.1,delay=1,bits=8,budget=256,crash=3")
    assert spec == ChannelSpec(drop=0.1, delay=1, bits=8, budget=256, crash=3)
    assert parse_channel("crash=tls_1+tls_4").crash == ("tls_1", "tls_4")
    assert parse_channel("") == ChannelSpec()
    for bad, needle in [
        ("drop=1.5", "[0, 1]"),
        ("drop=-0.1", "[0, 1]"),
        ("delay=-1", "delay='-1'; allowed: an integer 0..10000"),
        ("bits=4", "32, 16, 8, 1"),
        # Not "expected a number": 1.5 and 1e9 are numbers; say which integers are allowed.
        ("delay=x", "delay='x'; allowed: an integer 0..10000 (steps)"),
        ("delay=1.5", "delay='1.5'; allowed: an integer 0..10000 (steps)"),
        ("delay=1e9", "delay='1e9'; allowed: an integer 0..10000 (steps)"),
        ("delay=10001", "allowed: an integer 0..10000"),
        ("seed=-1", "seed='-1'; allowed: an integer >= 0"),
        ("budget=1.5", "budget='1.5'; allowed: an integer >= 0"),
    ]:
        with pytest.raises(ConfigError, match=re_escape(needle)):
            parse_channel(bad)
    with pytest.raises(UnknownNameError, match="did you mean 'drop'"):
        parse_channel("dorp=0.1")
    with pytest.raises(UnknownNameError, match="'tls_9'"):
        Channel(["tls_1", "tls_2"], parse_channel("crash=tls_9"))


def test_canonical_spelling_and_duplicate_keys():
    same = ["drop=0.3,bits=8", "bits=8,drop=0.3", " bits = 8 , drop=0.30,delay=0", "drop=3e-1,bits=8,budget=none"]
    assert {parse_channel(s).canonical() for s in same} == {"bits=8,drop=0.3"}
    for perfect in ["", "drop=0", "delay=0,bits=32", "crash=0"]:
        assert parse_channel(perfect).canonical() == ""
    assert parse_channel("crash=tls_4+tls_1,budget=0").canonical() == "budget=0,crash=tls_1+tls_4"
    # A given seed is kept (seed=0 too): it stops the run's seed replacing the channel's.
    assert parse_channel("seed=0").canonical() == "seed=0"
    assert ChannelSpec(seed=0).canonical() == "" and ChannelSpec(seed=5).canonical() == "seed=5"
    for text in ["drop=0.125,delay=2,bits=1,budget=64,crash=2,seed=9", "crash=b+a,drop=1"]:
        canonical = parse_channel(text).canonical()
        assert parse_channel(canonical).canonical() == canonical  # idempotent
        assert parse_channel(canonical).drop == parse_channel(text).drop
    with pytest.raises(ConfigError, match="'drop' given twice"):
        parse_channel("drop=0.1,drop=0.2")
    with pytest.raises(ConfigError, match="'bits' given twice"):
        parse_channel("bits=8,drop=0.1,bits=8")


def test_delivery_rate_counts_budget_refusals_as_attempts():
    n = 4
    size = message_bytes(4, 32)
    starved = Channel(agents(n), ChannelSpec(budget=size - 1), nx.complete_graph(agents(n)))
    for _ in range(3):
        starved.send_neighbours(np.ones((n, 4)))
    t = starved.totals()
    assert t["messages_sent"] == 0 and t["messages_over_budget"] == 3 * n * (n - 1)
    assert t["delivery_rate"] == 0.0  # every message refused: nothing was delivered
    half = Channel(agents(n), ChannelSpec(budget=size), nx.complete_graph(agents(n)))
    half.send_neighbours(np.ones((n, 4)))  # 1 of 3 messages per agent fits the budget
    assert half.totals()["delivery_rate"] == pytest.approx(1 / 3)
    silent = Channel(agents(n), ChannelSpec(drop=0.5), nx.complete_graph(agents(n)))
    silent.idle(4)
    assert silent.totals()["delivery_rate"] == 1.0  # nothing attempted, nothing failed


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_seeded_crash_choice_is_reproducible():
    a = Channel(agents(20), ChannelSpec(crash=3, seed=4))
    b = Channel(agents(20), ChannelSpec(crash=3, seed=4))
    assert a.crashed.sum() == 3 and (a.crashed == b.crashed).all()


@pytest.mark.parametrize("drop", [0.0, 0.1, 0.5])
def test_vectorised_step_delivers_exactly_what_the_per_message_loop_does(drop):
    """The loop `marl bench comms` times as its baseline is the same computation: from the same RNG
    state it delivers the same (src, dst, payload) messages as send_neighbours, step after step.
    (The speed ratio itself is measured by the bench, never asserted in a test.)"""
    n = 300
    g = nx.relabel_nodes(nx.random_regular_graph(4, n, seed=0), {i: f"a{i}" for i in range(n)})
    fast = Channel(agents(n), ChannelSpec(drop=drop, seed=11), g)
    slow = Channel(agents(n), ChannelSpec(drop=drop, seed=11), g)
    # float32-representable values: the vectorised step (bits=32) rounds to float32.
    payload = np.random.default_rng(0).random((n, 16)).astype(np.float32).astype(np.float64)
    total = 0
    for _ in range(4):
        d = fast.send_neighbours(payload)
        loop = send_neighbours_loop(slow, payload)
        assert list(zip(d.src.tolist(), d.dst.tolist())) == [(s, t) for s, t, _ in loop]
        assert np.array_equal(d.payload, np.array([row for _, _, row in loop]).reshape(-1, 16))
        total += len(d)
    expected = 4 * 4 * n * (1 - drop)
    assert abs(total - expected) <= 0.05 * 4 * 4 * n  # and loss really happened at the given rate
    with pytest.raises(ValueError, match="loss only"):
        send_neighbours_loop(Channel(agents(3), ChannelSpec(delay=1)), np.ones((3, 1)))


def test_run_seed_replaces_the_channel_seed_only_when_none_is_given():
    from comms.runtime import build_comms

    for text in ("drop=0.5,seed=0", "seed=0,drop=0.5"):
        canonical = parse_channel(text).canonical()
        assert canonical == "drop=0.5,seed=0"
        for spec in (text, canonical):
            assert build_comms("neighbours", spec, agents(3), 2, seed=7).channel.spec.seed == 0
    assert build_comms("neighbours", "drop=0.5", agents(3), 2, seed=7).channel.spec.seed == 7
