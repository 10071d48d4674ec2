"""Consensus over the channel: sum preservation, convergence, push-sum under loss and crashes,
robust aggregation against Byzantine agents, heartbeat failure detection, topology checks."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comms.channel import Channel, ChannelSpec
from comms.consensus import (
    HeartbeatDetector,
    average_consensus,
    check_topology,
    coordinate_median,
    false_suspicion_rate,
    push_sum,
    robust_consensus,
    trimmed_mean,
)
from marl.core.errors import ConfigError


def named(g: nx.Graph) -> tuple[list[str], nx.Graph]:
    mapping = {v: f"a{v}" for v in g.nodes}
    return [mapping[v] for v in sorted(g.nodes)], nx.relabel_nodes(g, mapping)


def regular(n: int = 16, d: int = 4, seed: int = 1) -> tuple[list[str], nx.Graph]:
    return named(nx.random_regular_graph(d, n, seed=seed))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 20), seed=st.integers(0, 10_000), p_dim=st.integers(1, 3))
def test_lossless_averaging_preserves_sum_and_converges(n, seed, p_dim):
    # small-world graphs from n=4 on, a path below (every case connected)
    g = nx.connected_watts_strogatz_graph(n, 2, 0.3, seed=seed) if n >= 4 else nx.path_graph(n)
    ids, g = named(g)
    x0 = np.random.default_rng(seed).normal(size=(n, p_dim)) * 10
    tr = average_consensus(x0, Channel(ids, ChannelSpec(), g), rounds=3000, tolerance=1e-8)
    assert np.allclose(tr.estimates.sum(axis=0), x0.sum(axis=0), atol=1e-9 * n * 10)
    assert np.abs(tr.estimates - x0.mean(axis=0)).max() <= 1e-6 * (np.abs(x0).max() + 1)


def test_symmetric_loss_keeps_mean_one_sided_loss_biases():
    ids, g = regular()
    x0 = np.random.default_rng(0).random((16, 4))
    sym = average_consensus(x0, Channel(ids, ChannelSpec(drop=0.3, seed=2), g), 200)
    one = average_consensus(x0, Channel(ids, ChannelSpec(drop=0.3, seed=2), g), 200, symmetric=False)
    assert np.abs(sym.estimates.mean(0) - x0.mean(0)).max() < 1e-12
    assert sym.rounds_to(1e-3) is not None
    assert np.abs(one.estimates.mean(0) - x0.mean(0)).max() > 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_push_sum_unbiased_under_loss(seed):
    ids, g = regular(seed=seed + 3)
    x0 = np.random.default_rng(seed).random((16, 3))
    tr = push_sum(x0, Channel(ids, ChannelSpec(drop=0.3, seed=seed), g), 50)
    assert tr.errors[-1] <= 1e-3
    assert np.abs(tr.estimates - x0.mean(0)).max() <= 1e-3


def test_push_sum_with_crashes_and_detector_reaches_survivors_average():
    ids, g = regular()
    check_topology(g, tolerate_crashes=2)
    x0 = np.random.default_rng(5).random((16, 2))
    ch = Channel(ids, ChannelSpec(drop=0.3, crash=2, seed=3), g)
    hb = HeartbeatDetector(ch, k=6)
    for _ in range(6):
        hb.step()
    tr = push_sum(x0, ch, 80, suspected=hb.suspected)
    alive = ch.alive
    assert np.abs(tr.estimates[alive] - x0[alive].mean(0)).max() <= 5e-3 * np.abs(x0).max()
    # Without the detector, mass pushed into the crashed agents is lost: a visible bias.
    blind = push_sum(x0, Channel(ids, ChannelSpec(drop=0.3, crash=2, seed=3), g), 80)
    assert blind.errors[-1] > 10 * tr.errors[-1]


def test_robust_aggregation_rules():
    values = np.array([[1.0], [2.0], [3.0], [100.0], [-50.0], [5.0], [6.0]])
    group = np.array([0, 0, 0, 0, 1, 1, 1])
    tm = trimmed_mean(values, group, 2, f=1)
    assert tm[:, 0].tolist() == [2.5, 5.0]
    med = coordinate_median(values, group, 2)
    assert med[:, 0].tolist() == [2.5, 5.0]


@pytest.mark.parametrize("byz", [1, 3])
def test_byzantine_breaks_plain_mean_not_trimmed_or_median(byz):
    ids, g = regular()
    x0 = np.random.default_rng(1).random((16, 2))
    bad = np.arange(byz)
    errs = {}
    for rule in ("mean", "trimmed", "median"):
        ch = Channel(ids, ChannelSpec(seed=0), g)
        errs[rule] = robust_consensus(x0, ch, 20, rule=rule, f=byz, byzantine=bad).errors[-1]
    assert errs["mean"] > 10  # far outside the honest range
    assert errs["trimmed"] <= 1.0  # stated bound: within the honest agents' range
    assert errs["median"] <= 1.0


def test_heartbeat_detector_suspects_crashed_within_k_and_false_rate():
    ids, g = regular(n=64)
    k = 3
    ch = Channel(ids, ChannelSpec(drop=0.4, seed=9), g)
    hb = HeartbeatDetector(ch, k)
    victim = 5
    neighbours = [int(v[1:]) for v in g.neighbors(f"a{victim}")]
    for _ in range(10):
        hb.step()
    ch.crash([victim])
    for step in range(1, k + 1):
        s = hb.step()
        assert s[neighbours, victim].all() == (step >= k)
    # False suspicion of live neighbours: probability drop**k per step (0.064 here).
    src, dst = ch.edges
    live = ch.alive[src] & ch.alive[dst]
    rates = []
    for _ in range(300):
        s = hb.step()
        rates.append(s[dst[live], src[live]].mean())
    assert abs(np.mean(rates) - false_suspicion_rate(0.4, k)) < 0.01


def test_topology_checks():
    with pytest.raises(ConfigError, match="disconnected"):
        check_topology(nx.Graph([(0, 1), (2, 3)]))
    ring = nx.cycle_graph(8)
    check_topology(ring, tolerate_crashes=1)
    with pytest.raises(ConfigError, match="vertex connectivity 2 cannot tolerate 2"):
        check_topology(ring, tolerate_crashes=2)
    with pytest.raises(ConfigError, match="k=0"):
        HeartbeatDetector(Channel(["a"], ChannelSpec()), 0)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), drop=st.floats(0.0, 0.6), rounds=st.integers(1, 40))
def test_push_sum_conserves_mass_under_loss(seed, drop, rounds):
    """Mass held by agents plus mass in flight (sent but not yet received) is the initial mass."""
    from comms.consensus import PushSum

    ids, g = regular(n=12, seed=seed % 7 + 1)
    x0 = np.random.default_rng(seed).normal(size=(12, 2))
    state = PushSum(x0, Channel(ids, ChannelSpec(drop=drop, seed=seed), g))
    for _ in range(rounds):
        state.step()
    total = state.mass.sum(axis=0) + (state.sigma - state.rho).sum(axis=0)
    assert np.allclose(total[:-1], x0.sum(axis=0), atol=1e-9)
    assert np.isclose(total[-1], 12.0)


def test_consensus_runs_refuse_bad_topologies():
    ids = [f"a{i}" for i in range(4)]
    split = nx.Graph([("a0", "a1"), ("a2", "a3")])
    with pytest.raises(ConfigError, match="disconnected"):
        average_consensus(np.zeros(4), Channel(ids, ChannelSpec(), split), 5)
    with pytest.raises(ConfigError, match="disconnected"):
        push_sum(np.zeros(4), Channel(ids, ChannelSpec(), np.array([[0, 1], [2, 3]])), 5)
    ring = nx.cycle_graph(ids)
    with pytest.raises(ConfigError, match="cannot tolerate 2 crashed"):
        push_sum(np.zeros(4), Channel(ids, ChannelSpec(), ring), 5, tolerate_crashes=2)
    assert len(average_consensus(np.arange(4.0), Channel(ids, ChannelSpec(), ring), 3, tolerate_crashes=1).errors) == 3


@pytest.mark.parametrize("f", [1, 2, 3])
def test_fast_connectivity_check_agrees_with_networkx(f):
    for seed in range(6):
        g = nx.gnp_random_graph(14, 0.3, seed=seed)
        if not nx.is_connected(g):
            continue
        kappa = nx.node_connectivity(g)
        if kappa <= f:
            with pytest.raises(ConfigError, match=f"connectivity {kappa} "):
                check_topology(g, f)
        else:
            check_topology(g, f)
