"""Consensus over a lossy channel: average consensus, push-sum, robust aggregation, heartbeats.

Every algorithm here runs its rounds through a :class:`comms.channel.Channel` (one channel step
per round), so the channel's loss, delay, quantisation and crashed agents apply, and its byte
counters measure what consensus costs. All rounds are vectorised over messages with numpy.

* :func:`average_consensus` — ``x_i <- x_i + sum_j w_ij (x_j - x_i)`` with Metropolis–Hastings
  weights ``w_ij = 1 / (1 + max(d_i, d_j))`` (Xiao & Boyd 2004; Xiao, Boyd & Lall 2005). With
  ``symmetric=True`` an edge update happens only when both directions of the exchange arrived
  in the round (an acknowledged exchange), so every update is pairwise antisymmetric and the
  network sum is preserved exactly whatever is lost; with ``symmetric=False`` one-sided loss
  biases the result.
* :func:`push_sum` — ratio consensus (Kempe, Dobra & Gehrke 2003) in the running-sum form of
  Hadjicostis, Domínguez-García & Vaidya (IEEE TAC 2016): each link carries the cumulative mass
  sent along it, so a lost message's mass arrives with the next one that gets through and the
  ratio stays unbiased under one-sided loss. Works on directed links, so a neighbour wrongly
  suspected by a failure detector only removes one direction.
* :func:`trimmed_mean`, :func:`coordinate_median`, :func:`robust_consensus` — Byzantine-robust
  aggregation (Yin et al., ICML 2018): the coordinate-wise median tolerates a Byzantine fraction
  below 1/2 of the values aggregated; the ``f``-trimmed mean (drop the ``f`` largest and ``f``
  smallest per coordinate) tolerates up to ``f`` Byzantine values among those aggregated, and
  with ``b <= f`` Byzantine values it lies within the range of the honest values. Iterated over
  the complete graph (broadcast), honest agents end within the convex hull of honest inputs.
* :class:`HeartbeatDetector` — suspects a neighbour after ``k`` consecutive missed heartbeats.
  Under independent loss ``p`` a live neighbour is suspected at a given step exactly when its
  last ``k`` heartbeats were all lost: false-suspicion probability ``p**k`` per window of ``k``
  heartbeats (:func:`false_suspicion_rate`); a crashed neighbour is suspected after ``k`` steps.
* :func:`check_topology` — refuses a disconnected topology, and, when asked to tolerate ``f``
  crashed agents, one whose vertex connectivity is ``<= f`` (``f`` crashes could cut it).

Error measure used throughout: the *relative error* after a round is
``max_i |x_i - xbar|_inf / max_i |x0_i - xbar|_inf`` over live agents, ``xbar`` the live agents'
initial average — how much of the initial disagreement is left.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from comms.channel import Channel, Delivery, quantise, segment_sum
from marl.core.errors import ConfigError, unknown

__all__ = [
    "ConsensusTrace",
    "check_topology",
    "metropolis_step",
    "average_consensus",
    "PushSum",
    "push_sum",
    "coordinate_median",
    "trimmed_mean",
    "robust_consensus",
    "HeartbeatDetector",
    "false_suspicion_rate",
    "relative_error",
]


def _connectivity_at_most(graph: nx.Graph, f: int) -> int | None:
    """Vertex connectivity of a connected ``graph`` if it is ``<= f``, else None.

    For ``f <= 2`` this uses articulation points (linear time; ``f == 2`` repeats it once per
    removed vertex) instead of networkx's flow-based ``node_connectivity`` (~1 s at 256 agents).
    """
    n = graph.number_of_nodes()
    if n - 1 <= f:  # a complete graph on n nodes has connectivity n - 1
        return min(nx.node_connectivity(graph), n - 1)
    if f >= 3:
        kappa = nx.node_connectivity(graph)
        return kappa if kappa <= f else None
    if next(nx.articulation_points(graph), None) is not None:
        return 1
    if f == 2:
        for v in list(graph.nodes):
            rest = graph.subgraph([u for u in graph.nodes if u != v])
            if next(nx.articulation_points(rest), None) is not None:
                return 2
    return None


def check_topology(graph: nx.Graph, tolerate_crashes: int = 0) -> None:
    """Raise ConfigError if ``graph`` is disconnected or ``tolerate_crashes`` agents could cut it."""
    if graph.number_of_nodes() == 0:
        raise ConfigError("consensus topology has no agents; allowed: a connected graph")
    if not nx.is_connected(graph):
        parts = nx.number_connected_components(graph)
        raise ConfigError(f"consensus topology is disconnected ({parts} components); allowed: a connected graph")
    if tolerate_crashes > 0:
        kappa = _connectivity_at_most(graph, tolerate_crashes)
        if kappa is not None:
            raise ConfigError(
                f"topology vertex connectivity {kappa} cannot tolerate {tolerate_crashes} crashed "
                f"agents; allowed: connectivity > {tolerate_crashes} (add links or tolerate fewer)"
            )


def relative_error(x: np.ndarray, target: np.ndarray, scale: float) -> float:
    """``max_i |x_i - target|_inf / scale`` (``scale``: the initial disagreement)."""
    if len(x) == 0:
        return 0.0
    return float(np.abs(x - target).max() / max(scale, 1e-300))


@dataclass
class ConsensusTrace:
    """Result of a consensus run: final estimates and the relative error after each round."""

    estimates: np.ndarray  #: (N, P) final estimate of every agent (crashed agents: their input)
    errors: list[float] = field(default_factory=list)  #: relative error of live agents per round
    target: np.ndarray | None = None  #: live agents' initial average

    def rounds_to(self, tolerance: float) -> int | None:
        """First round (1-based) whose relative error is <= ``tolerance``; None if never."""
        for r, err in enumerate(self.errors, 1):
            if err <= tolerance:
                return r
        return None


def _as_matrix(x0: np.ndarray) -> np.ndarray:
    x = np.array(x0, dtype=np.float64)
    return x[:, None] if x.ndim == 1 else x


def _edge_ids(channel: Channel, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Position of each directed link (src -> dst) in ``channel.edges`` (links must exist)."""
    return np.searchsorted(channel._link_keys, src * channel.n + dst)


def metropolis_step(
    x: np.ndarray, channel: Channel, *, symmetric: bool = True, senders: np.ndarray | None = None
) -> np.ndarray:
    """One round of Metropolis–Hastings average consensus over ``channel``; returns new ``x``.

    Only agents with ``senders[i]`` (all by default) send their value this round.
    """
    delivery = channel.send_neighbours(x, senders)
    deg = channel.degree()
    src, dst, val = delivery.src, delivery.dst, delivery.payload
    if symmetric and len(src):
        # Update along (i, j) only if both i -> j and j -> i arrived: the pair then moves by
        # +w(x_j - x_i) and +w(x_i - x_j), so the sum is untouched (up to rounding).
        keys = np.sort(src * channel.n + dst)
        rev = dst * channel.n + src
        pos = np.minimum(np.searchsorted(keys, rev), len(keys) - 1)
        both = keys[pos] == rev
        src, dst, val = src[both], dst[both], val[both]
    w = 1.0 / (1.0 + np.maximum(deg[src], deg[dst]))
    # The receiver sees q(x_j), not x_j. Using its own *sent* value q(x_i) in the difference keeps
    # the pair update antisymmetric, so quantisation does not leak into the network sum
    # (the quantiser is deterministic: the sender knows what it sent).
    own = quantise(x, channel.spec.bits)
    return x + segment_sum(w[:, None] * (val - own[dst]), dst, channel.n)


def _trace_setup(x0: np.ndarray, channel: Channel) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    x = _as_matrix(x0)
    alive = channel.alive
    if not alive.any():
        raise ConfigError("every agent is crashed; allowed: at least one live agent")
    target = x[alive].mean(axis=0)
    scale = float(np.abs(x[alive] - target).max())
    return x, alive, target, scale


def average_consensus(
    x0: np.ndarray,
    channel: Channel,
    rounds: int,
    *,
    symmetric: bool = True,
    tolerance: float = 0.0,
    tolerate_crashes: int = 0,
) -> ConsensusTrace:
    """Run ``rounds`` Metropolis rounds from ``x0`` (N or N x P); stop early at ``tolerance``.

    The channel's topology must be connected and, with ``tolerate_crashes = f``, have vertex
    connectivity > f (:func:`check_topology`); otherwise ConfigError.
    """
    check_topology(channel.graph(), tolerate_crashes)
    x, alive, target, scale = _trace_setup(x0, channel)
    trace = ConsensusTrace(x, [], target)
    for _ in range(rounds):
        x = metropolis_step(x, channel, symmetric=symmetric)
        trace.errors.append(relative_error(x[alive], target, scale))
        if trace.errors[-1] <= tolerance:
            break
    trace.estimates = x
    return trace


class PushSum:
    """Running-sum push-sum state over a channel's current topology (robust to message loss).

    Each agent holds mass ``(s_i, w_i)`` (value sum and weight, ``w`` starting at 1). In a round
    it keeps a share ``1 / (1 + d_i)`` of its mass and adds one share to the cumulative counter
    ``sigma_ij`` of each out-link it uses (``d_i`` links: neighbours it does not suspect); the
    message on ``i -> j`` carries ``sigma_ij``. The receiver adds ``sigma_ij - rho_ij`` (``rho``:
    the last counter it received on that link). Mass is never lost, only delayed, so
    ``s_i / w_i`` converges to the average of the live agents' inputs. The topology must stay
    fixed while the state lives (the counters are per link).
    """

    def __init__(self, x0: np.ndarray, channel: Channel) -> None:
        x = _as_matrix(x0)
        self.channel = channel
        n, p = x.shape
        self.mass = np.hstack([x, np.ones((n, 1))])  # columns: values..., weight
        src, _ = channel.edges
        self.sigma = np.zeros((len(src), p + 1))
        self.rho = np.zeros((len(src), p + 1))

    def step(self, suspected: np.ndarray | None = None) -> None:
        """One round; ``suspected[i, j]``: agent ``i`` does not send to neighbour ``j``."""
        ch = self.channel
        src, dst = ch.edges
        if len(src) != len(self.sigma):
            raise ValueError("the topology changed during push-sum; start a new PushSum")
        use = ch.alive[src].copy()
        if suspected is not None:
            use &= ~suspected[src, dst]
        out_deg = np.bincount(src[use], minlength=ch.n)
        share = self.mass / (1.0 + out_deg)[:, None]
        live = ch.alive
        self.mass[live] = share[live]
        self.sigma[use] += share[src[use]]
        delivery = ch.send(src[use], dst[use], self.sigma[use])
        self._receive(delivery)

    def _receive(self, delivery: Delivery) -> None:
        if not len(delivery):
            return
        e = _edge_ids(self.channel, delivery.src, delivery.dst)
        gain = delivery.payload - self.rho[e]
        self.rho[e] = delivery.payload
        self.mass += segment_sum(gain, delivery.dst, self.channel.n)

    @property
    def estimates(self) -> np.ndarray:
        return self.mass[:, :-1] / self.mass[:, -1:]


def push_sum(
    x0: np.ndarray,
    channel: Channel,
    rounds: int,
    *,
    suspected: np.ndarray | None = None,
    tolerance: float = 0.0,
    tolerate_crashes: int = 0,
) -> ConsensusTrace:
    """Run ``rounds`` of running-sum push-sum from ``x0``; see :class:`PushSum`.

    ``suspected`` (N x N) marks links not to use, e.g. ``HeartbeatDetector.suspected`` after a
    warm-up, so no mass is sent into crashed agents. Topology checks as in
    :func:`average_consensus`.
    """
    check_topology(channel.graph(), tolerate_crashes)
    _, alive, target, scale = _trace_setup(x0, channel)
    state = PushSum(x0, channel)
    trace = ConsensusTrace(state.estimates, [], target)
    for _ in range(rounds):
        state.step(suspected)
        trace.errors.append(relative_error(state.estimates[alive], target, scale))
        if trace.errors[-1] <= tolerance:
            break
    trace.estimates = state.estimates
    return trace


# -- robust aggregation -------------------------------------------------------------------------


def _sorted_groups(values: np.ndarray, group: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad messages grouped by ``group`` into (n, K, P) sorted per coordinate (NaN pads last)."""
    order = np.argsort(group, kind="stable")
    g = group[order]
    counts = np.bincount(g, minlength=n)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    slot = np.arange(len(g)) - starts[g]
    k = int(counts.max()) if len(g) else 1
    padded = np.full((n, max(k, 1), values.shape[1]), np.nan)
    padded[g, slot] = values[order]
    return np.sort(padded, axis=1), counts


def trimmed_mean(values: np.ndarray, group: np.ndarray, n: int, f: int) -> np.ndarray:
    """Per group and coordinate: mean after dropping the ``f`` largest and ``f`` smallest values.

    Tolerates up to ``f`` Byzantine values per group; a group with ``<= 2f`` values falls back to
    its median.
    """
    ordered, counts = _sorted_groups(np.asarray(values, float), group, n)
    pos = np.arange(ordered.shape[1])[None, :, None]
    keep = (pos >= f) & (pos < (counts[:, None, None] - f))
    total = np.where(keep, ordered, 0.0).sum(axis=1)
    used = keep.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = total / used
    if (used == 0).any():
        out = np.where(used > 0, out, np.nanmedian(ordered, axis=1))
    return out


def coordinate_median(values: np.ndarray, group: np.ndarray, n: int) -> np.ndarray:
    """Per group and coordinate: the median (tolerates a Byzantine fraction below 1/2)."""
    ordered, _ = _sorted_groups(np.asarray(values, float), group, n)
    return np.nanmedian(ordered, axis=1)


def robust_consensus(
    x0: np.ndarray,
    channel: Channel,
    rounds: int,
    *,
    rule: str = "trimmed",
    f: int = 1,
    byzantine: np.ndarray | None = None,
    attack: float = 1e3,
    broadcast: bool = True,
) -> ConsensusTrace:
    """Iterated robust averaging with Byzantine agents; errors are against the honest average.

    Each round every agent sends its value (broadcast, or to neighbours); honest agent ``i``
    replaces its value with ``rule`` (``"trimmed"``: ``f``-trimmed mean, ``"median"``: coordinate
    median, ``"mean"``: plain average — which one Byzantine agent breaks) over its own value and
    what arrived. Byzantine agents (indices in ``byzantine``) are two-faced: each message they
    send carries ``+attack`` or ``-attack`` times the honest spread, alternating by receiver, and
    they never update. The error scale is the honest agents' initial disagreement.
    """
    rules = ("trimmed", "median", "mean")
    if rule not in rules:
        raise unknown("robust consensus rule", rule, rules)
    x = _as_matrix(x0)
    n = channel.n
    bad = np.zeros(n, dtype=bool)
    if byzantine is not None:
        bad[np.asarray(byzantine, dtype=np.int64)] = True
    honest = channel.alive & ~bad
    target = x[honest].mean(axis=0)
    spread = float(np.abs(x[honest] - target).max()) or 1.0
    trace = ConsensusTrace(x, [], target)
    for _ in range(rounds):
        d = channel.send_broadcast(x) if broadcast else channel.send_neighbours(x)
        payload = d.payload.copy()
        liar = bad[d.src]
        sign = np.where(d.dst[liar] % 2 == 0, 1.0, -1.0)
        payload[liar] = target + sign[:, None] * attack * spread
        values = np.vstack([x, payload])
        group = np.r_[np.arange(n), d.dst]
        if rule == "trimmed":
            new = trimmed_mean(values, group, n, f)
        elif rule == "median":
            new = coordinate_median(values, group, n)
        else:
            new = segment_sum(values, group, n) / np.bincount(group, minlength=n)[:, None]
        x = np.where(honest[:, None], new, x)
        trace.errors.append(relative_error(x[honest], target, spread))
    trace.estimates = x
    return trace


# -- failure detection --------------------------------------------------------------------------


def false_suspicion_rate(drop: float, k: int) -> float:
    """Probability that a live neighbour is suspected at a given step: all last ``k`` lost."""
    return float(drop) ** int(k)


class HeartbeatDetector:
    """Each step every live agent sends an empty heartbeat to its neighbours over ``channel``;
    agent ``i`` suspects neighbour ``j`` once ``k`` consecutive heartbeats from ``j`` are missing.

    A crashed neighbour is suspected after exactly ``k`` steps. A live one is falsely suspected
    at a given step with probability ``drop**k`` (:func:`false_suspicion_rate`) and cleared by
    its next heartbeat that arrives.
    """

    def __init__(self, channel: Channel, k: int) -> None:
        if k < 1:
            raise ConfigError(f"bad heartbeat k={k}; allowed: an integer >= 1 (missed heartbeats)")
        self.channel = channel
        self.k = int(k)
        self.missed = np.zeros(len(channel.edges[0]), dtype=np.int64)

    def step(self) -> np.ndarray:
        """Send one round of heartbeats; return the (N x N) ``suspected[i, j]`` matrix."""
        ch = self.channel
        if len(self.missed) != len(ch.edges[0]):  # the topology changed: start counting afresh
            self.missed = np.zeros(len(ch.edges[0]), dtype=np.int64)
        d = ch.send_neighbours(np.zeros((ch.n, 0)))
        arrived = np.zeros(len(self.missed), dtype=bool)
        if len(d):
            arrived[_edge_ids(ch, d.src, d.dst)] = True
        self.missed = np.where(arrived, 0, self.missed + 1)
        return self.suspected

    @property
    def suspected(self) -> np.ndarray:
        """``suspected[i, j]``: agent ``i`` suspects its neighbour ``j``."""
        src, dst = self.channel.edges
        out = np.zeros((self.channel.n, self.channel.n), dtype=bool)
        hit = self.missed >= self.k
        out[dst[hit], src[hit]] = True
        return out
