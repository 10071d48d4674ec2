"""The channel: what arrives of what agents send — loss, delay, quantisation, crashes, bytes.

A :class:`Channel` connects ``N`` agents (ids in a fixed order) over a topology — a
``networkx.Graph`` over the agent ids, or a precomputed ``(E, 2)`` array of index pairs — and is
driven one *step* at a time. In each step agents hand it messages; each message is one payload
vector of ``P`` floats from a sender index to a receiver index. The channel then

* refuses messages from a crashed sender (a crashed agent says nothing; nothing is counted);
* refuses messages beyond a sender's byte budget for the step (counted in ``over_budget``);
* loses messages sent along a link the topology lacks (except broadcasts, which ignore it);
* loses each remaining message independently with probability ``drop``;
* quantises the payload to ``bits`` bits per value (the receiver sees the quantised value);
* holds messages for ``delay`` steps: what was sent at step ``t`` arrives at ``t + delay``;
* never delivers to a receiver that is crashed when the message arrives.

Everything is vectorised over messages (index arrays, numpy gathers and ``bincount``); no Python
loop runs over messages or agents, so one step of 1000 agents on a 4-regular graph (4000
messages of 16 floats) costs well under a millisecond of numpy work.

Byte model (what ``bytes_*`` counters count), per message::

    bytes = HEADER_BYTES + (SCALE_BYTES if bits < 32 else 0) + ceil(P * bits / 8)

``HEADER_BYTES`` (8) stands for sender id, receiver id and step (2 + 2 + 4 bytes);
``SCALE_BYTES`` (8) carries the float32 offset and step of the uniform quantiser. A message with
an empty payload (a heartbeat) costs the header alone.

Quantisation (``bits`` < 32) is uniform min-max per message: with ``lo``/``hi`` the payload's
minimum and maximum and ``L = 2**bits - 1`` levels, each value is rounded to the nearest of
``lo + k (hi - lo) / L``, so ``|x - q(x)| <= (hi - lo) / (2 L)`` (:func:`quantisation_bound`).
With ``bits == 1`` a value becomes ``lo`` or ``hi``. ``bits == 32`` rounds to float32.

The channel is also what learned protocols use: :meth:`Channel.delivery_mask` draws this step's
``N x N`` boolean mask (``mask[i, j]``: the message from ``j`` reaches ``i``), with the same loss,
crash and topology rules and the same accounting, so training sees the losses evaluation sees.

CLI form (``--channel``), parsed by :func:`parse_channel`::

    drop=0.1,delay=1,bits=8,budget=256,crash=3,seed=7     # crash 3 agents chosen by seed
    crash=tls_1+tls_4                                      # crash these agents

Each key may appear once. :meth:`ChannelSpec.canonical` gives the one spelling of a setting
(sorted keys, defaults left out, ``""`` for a perfect channel), so ``bits=8,drop=0.3``,
``drop=0.3,bits=8`` and ``drop=0.3,bits=8,delay=0`` are one setting, and ``drop=0`` is ``""``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import networkx as nx
import numpy as np

from marl.core.errors import ConfigError, show, unknown

__all__ = [
    "ChannelSpec",
    "Channel",
    "Delivery",
    "parse_channel",
    "send_neighbours_loop",
    "message_bytes",
    "quantise",
    "delivery_rate",
    "quantisation_bound",
    "segment_sum",
    "segment_max",
    "HEADER_BYTES",
    "SCALE_BYTES",
    "ALLOWED_BITS",
]

HEADER_BYTES = 8  #: sender id (2) + receiver id (2) + step (4)
SCALE_BYTES = 8  #: float32 offset + float32 step of the uniform quantiser (bits < 32 only)
ALLOWED_BITS = (32, 16, 8, 1)
#: Longest delay a spec may ask for, in steps: longer than any episode Concord runs (a traffic
#: hour at 1 s steps is 3600), so a larger value can only be a typo such as ``delay=1e9``.
MAX_DELAY = 10_000
#: What each channel key accepts, as every message about a bad value says it.
ALLOWED = {
    "drop": "a probability in [0, 1]",
    "delay": f"an integer 0..{MAX_DELAY} (steps)",
    "bits": "one of " + ", ".join(map(str, ALLOWED_BITS)),
    "budget": "an integer >= 0 (bytes per agent per step) or none",
    "crash": "a count >= 0 or agent ids joined by + (crash=tls_1+tls_4)",
    "seed": "an integer >= 0",
}


def _bad(key: str, value: object) -> ConfigError:
    return ConfigError(f"bad channel {key}={show(value)}; allowed: {ALLOWED[key]}")


@dataclass(frozen=True)
class ChannelSpec:
    """What the channel does to messages. The default is a perfect channel.

    ``crash`` is either a number of agents to crash (chosen with ``seed`` when the channel is
    built) or a tuple of agent ids.
    """

    drop: float = 0.0  #: probability that a message is lost, independently per message
    delay: int = 0  #: steps between sending and delivery
    bits: int = 32  #: bits per payload value: 32 (float32), 16, 8 or 1 (uniform quantiser)
    budget: int | None = None  #: bytes an agent may send per step (None: unlimited)
    crash: int | tuple[str, ...] = 0  #: crashed agents: how many (seeded) or which ids
    seed: int = 0  #: seeds drops and the choice of crashed agents
    #: True when the spec names its seed (``seed=0`` included): the run's seed then does not
    #: replace it (comms.runtime.build_comms). Not part of equality: the channel is the same.
    seed_given: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.crash, (list, tuple, set, frozenset)):
            # Crashed ids are a set: one order, no repeats, and no ids at all is no crash.
            ids = tuple(sorted(dict.fromkeys(str(i) for i in self.crash)))
            object.__setattr__(self, "crash", ids if ids else 0)
        if isinstance(self.drop, bool) or not (isinstance(self.drop, (int, float)) and 0.0 <= float(self.drop) <= 1.0):
            raise _bad("drop", self.drop)
        if not _is_int(self.delay) or not 0 <= self.delay <= MAX_DELAY:
            raise _bad("delay", self.delay)
        if self.bits not in ALLOWED_BITS:
            raise _bad("bits", self.bits)
        if self.budget is not None and (not _is_int(self.budget) or self.budget < 0):
            raise _bad("budget", self.budget)
        if isinstance(self.crash, int) and self.crash < 0:
            raise _bad("crash", self.crash)
        if not _is_int(self.seed) or self.seed < 0:
            raise _bad("seed", self.seed)

    def canonical(self) -> str:
        """The one spelling of this setting: ``key=value`` pairs in sorted key order, only values
        that differ from a perfect channel's (plus ``seed`` when given), ``""`` for a perfect
        channel. ``parse_channel(spec.canonical())`` is the same channel (crash ids come back sorted).

        >>> parse_channel("drop=0.3,bits=8,delay=0").canonical()
        'bits=8,drop=0.3'
        """
        default = ChannelSpec()
        parts: dict[str, str] = {}
        if self.drop != default.drop:
            parts["drop"] = repr(float(self.drop))
        if self.delay != default.delay:
            parts["delay"] = str(int(self.delay))
        if self.bits != default.bits:
            parts["bits"] = str(int(self.bits))
        if self.budget is not None:
            parts["budget"] = str(int(self.budget))
        if isinstance(self.crash, tuple):
            if self.crash:  # crashed ids are a set: their order says nothing
                parts["crash"] = "+".join(sorted(dict.fromkeys(self.crash)))
        elif self.crash:
            parts["crash"] = str(int(self.crash))
        if self.seed_given or self.seed != default.seed:
            parts["seed"] = str(int(self.seed))
        return ",".join(f"{key}={parts[key]}" for key in sorted(parts))


_INT_KEYS = {"delay", "bits", "budget", "seed"}


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def parse_channel(spec: str) -> ChannelSpec:
    """Parse ``"drop=0.1,delay=1,bits=8,budget=256,crash=3"``; ``""`` is a perfect channel.

    ``crash`` takes a count (agents chosen by ``seed``) or ids joined by ``+``
    (``crash=tls_1+tls_4``); ids are checked against the agents when the channel is built.
    A key given twice (``drop=0.1,drop=0.2``) is an error rather than a silent last-one-wins.
    """
    allowed = [f.name for f in fields(ChannelSpec) if f.name != "seed_given"]
    values: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        key, sep, text = part.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise ConfigError(f"bad channel item {show(part)}; expected key=value, e.g. drop=0.1,delay=1")
        if key not in allowed:
            raise unknown("channel key", key, allowed)
        if key in values:
            raise ConfigError(f"bad channel {show(spec)}: key '{key}' given twice; allowed: each key once")
        try:
            if key == "drop":
                values[key] = float(text)
            elif key == "budget" and text.lower() in {"none", ""}:
                values[key] = None
            elif key in _INT_KEYS:
                values[key] = int(text)
            elif key == "crash":
                values[key] = int(text) if text.isdigit() else tuple(t for t in text.split("+") if t)
        except ValueError:
            raise _bad(key, text) from None
    return ChannelSpec(**values, seed_given="seed" in values)


def send_neighbours_loop(channel: Channel, payloads: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    """Reference per-message Python loop for :meth:`Channel.send_neighbours` on a loss-only channel.

    Walks the channel's directed links in the same order and draws one loss number per message
    from the channel's RNG, so from the same RNG state it delivers exactly the same
    ``(src, dst, payload row)`` triples as the vectorised step (payload rows unquantised; with
    ``bits=32`` the vectorised step returns them rounded to float32). It neither advances the
    step clock nor counts anything. ``marl bench comms`` times it as the baseline of its
    throughput ratio and tests/test_channel.py checks the equivalence.
    """
    spec = channel.spec
    if spec.delay or spec.budget is not None or spec.bits != 32 or channel.crashed.any():
        raise ValueError("send_neighbours_loop models loss only: no delay, budget, quantisation or crashes")
    drop = float(spec.drop)
    rand = channel.rng.random
    src, dst = channel.edges
    if drop <= 0:  # the vectorised step draws nothing without loss
        return [(s, d, payloads[s]) for s, d in zip(src.tolist(), dst.tolist())]
    return [(s, d, payloads[s]) for s, d in zip(src.tolist(), dst.tolist()) if rand() >= drop]


def message_bytes(payload_size: int, bits: int) -> int:
    """Bytes one message of ``payload_size`` values costs under the documented byte model."""
    scale = SCALE_BYTES if bits < 32 and payload_size > 0 else 0
    return HEADER_BYTES + scale + math.ceil(payload_size * bits / 8)


def quantise(x: np.ndarray, bits: int) -> np.ndarray:
    """What a receiver sees of rows of ``x`` (one message per row) sent with ``bits`` per value."""
    x = np.asarray(x, dtype=np.float64)
    if bits >= 32:
        return x.astype(np.float32).astype(np.float64)
    if x.size == 0:
        return x.copy()
    levels = float(2**bits - 1)
    lo = x.min(axis=-1, keepdims=True)
    hi = x.max(axis=-1, keepdims=True)
    span = hi - lo
    step = np.where(span > 0, span / levels, 1.0)
    return lo + np.rint((x - lo) / step) * step


def quantisation_bound(x: np.ndarray, bits: int) -> np.ndarray:
    """Per-row bound on ``|x - quantise(x, bits)|`` (float32 rounding for 32 bits)."""
    x = np.asarray(x, dtype=np.float64)
    if bits >= 32:
        return np.abs(x).max(axis=-1) * 2.0**-24 + 1e-45
    return (x.max(axis=-1) - x.min(axis=-1)) / (2 * (2**bits - 1))


def segment_sum(values: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """Row sums of ``values`` (M x P) grouped by ``index`` (M,) into ``n`` rows (n x P)."""
    values = np.asarray(values, dtype=np.float64)
    out = np.zeros((n, values.shape[1]))
    if len(index):
        order = np.argsort(index, kind="stable")
        idx = index[order]
        starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
        out[idx[starts]] = np.add.reduceat(values[order], starts, axis=0)
    return out


def segment_max(values: np.ndarray, index: np.ndarray, n: int, empty: float = 0.0) -> np.ndarray:
    """Row-wise maxima of ``values`` grouped by ``index``; rows with no message get ``empty``."""
    values = np.asarray(values, dtype=np.float64)
    out = np.full((n, values.shape[1]), empty)
    if len(index):
        order = np.argsort(index, kind="stable")
        idx = index[order]
        starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
        out[idx[starts]] = np.maximum.reduceat(values[order], starts, axis=0)
    return out


@dataclass
class Delivery:
    """Messages that arrive in one step: ``payload[m]`` went from ``src[m]`` to ``dst[m]``."""

    src: np.ndarray  #: (M,) sender indices
    dst: np.ndarray  #: (M,) receiver indices
    payload: np.ndarray  #: (M, P) what the receivers see (quantised)
    n_agents: int

    def __len__(self) -> int:
        return len(self.src)

    def count(self) -> np.ndarray:
        """(N,) messages received per agent."""
        return np.bincount(self.dst, minlength=self.n_agents)

    def sum(self) -> np.ndarray:
        """(N, P) sum of received payloads per agent."""
        return segment_sum(self.payload, self.dst, self.n_agents)

    def mean(self) -> np.ndarray:
        """(N, P) mean of received payloads per agent (zeros where nothing arrived)."""
        count = self.count()
        return self.sum() / np.maximum(count, 1)[:, None]

    def max(self) -> np.ndarray:
        """(N, P) element-wise maximum of received payloads (zeros where nothing arrived)."""
        return segment_max(self.payload, self.dst, self.n_agents)

    def mask(self) -> np.ndarray:
        """(N, N) boolean: ``mask[i, j]`` iff a message from ``j`` reached ``i`` this step."""
        m = np.zeros((self.n_agents, self.n_agents), dtype=bool)
        m[self.dst, self.src] = True
        return m


@dataclass
class _Counters:
    """Per-agent totals over the channel's life (since the last :meth:`Channel.reset`)."""

    n: int
    sent_msgs: np.ndarray = field(init=False)  #: by sender
    sent_bytes: np.ndarray = field(init=False)
    delivered_msgs: np.ndarray = field(init=False)  #: by receiver
    delivered_bytes: np.ndarray = field(init=False)
    dropped_msgs: np.ndarray = field(init=False)  #: by sender: lost, no link, dead receiver
    dropped_bytes: np.ndarray = field(init=False)
    over_budget_msgs: np.ndarray = field(init=False)  #: by sender: refused by the byte budget

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "n":
                setattr(self, f.name, np.zeros(self.n, dtype=np.int64))


def delivery_rate(delivered: int, dropped: int, over_budget: int) -> float:
    """Share of attempted messages that arrived: ``delivered / (delivered + dropped + over_budget)``.

    Attempted = delivered, lost (loss, missing link, dead receiver) or refused by the byte budget;
    messages still in the delay line are not decided yet and count nowhere, and a crashed
    sender attempts nothing. With nothing attempted at all (no message delivered, lost or
    refused) the rate is 1.0 — nothing failed — so records stay finite; a budget that refuses
    every message gives 0.0.
    """
    attempted = delivered + dropped + over_budget
    return delivered / attempted if attempted else 1.0


class Channel:
    """Lossy, delayed, quantising, byte-counting delivery between ``agents`` over a topology.

    Use :meth:`send_neighbours`, :meth:`send_broadcast` or :meth:`send` to transmit this step's
    messages and get back a :class:`Delivery` of what arrives now; each call advances the step.
    :meth:`set_topology` may be called every step (a new graph is indexed once and cached).
    """

    def __init__(
        self,
        agents: list[str],
        spec: ChannelSpec | None = None,
        topology: nx.Graph | np.ndarray | None = None,
    ) -> None:
        self.agents = list(agents)
        self.n = len(self.agents)
        self.index = {a: i for i, a in enumerate(self.agents)}
        self.spec = spec or ChannelSpec()
        self.crashed = np.zeros(self.n, dtype=bool)
        self._crash_from_spec()
        self._graph: Any = None
        self._graph_edges = -1
        self._src = np.zeros(0, dtype=np.int64)  # directed edge list (both directions)
        self._dst = np.zeros(0, dtype=np.int64)
        self._link_keys = np.zeros(0, dtype=np.int64)  # sorted src * n + dst
        self.reset()
        if topology is not None:
            self.set_topology(topology)

    # -- setup --------------------------------------------------------------------------------

    def _crash_from_spec(self) -> None:
        crash = self.spec.crash
        if isinstance(crash, tuple):
            for agent in crash:
                if agent not in self.index:
                    raise unknown("agent in channel crash", agent, self.agents)
                self.crashed[self.index[agent]] = True
        elif crash:
            if crash > self.n:
                raise ConfigError(f"bad channel crash={crash}; allowed: at most {self.n} agents")
            pick = np.random.default_rng([self.spec.seed, 1]).choice(self.n, crash, replace=False)
            self.crashed[pick] = True

    def reset(self, seed: int | list[int] | None = None) -> None:
        """Empty the delay line, zero the counters, restart the step clock and the drop RNG
        (seeded with ``seed``, default the spec's seed). Crashed agents stay crashed."""
        self.rng = np.random.default_rng(self.spec.seed if seed is None else seed)
        self.t = 0
        self.counters = _Counters(self.n)
        #: per step: messages sent, delivered, dropped; bytes sent, delivered
        self.step_log: list[tuple[int, int, int, int, int]] = []
        self._pending: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []

    def crash(self, agents: Sequence[str | int] | np.ndarray) -> None:
        """Crash agents now (ids or indices): they stop sending and receiving."""
        for a in agents:
            if isinstance(a, str) and a not in self.index:
                raise unknown("agent to crash", a, self.agents)
        idx = [self.index[a] if isinstance(a, str) else int(a) for a in agents]
        self.crashed[idx] = True

    @property
    def alive(self) -> np.ndarray:
        return ~self.crashed

    def set_topology(self, topology: nx.Graph | np.ndarray) -> None:
        """Use ``topology`` from now on: a graph over agent ids or an (E, 2) index array.

        A graph that is the same object with the same edge count as last time is not re-indexed
        (the channel keeps a reference, so the object's id cannot be reused by another graph). A
        graph edited in place keeping its edge count needs ``set_topology(np.array(edges))``.
        """
        if isinstance(topology, np.ndarray):
            self._set_edges(np.asarray(topology, dtype=np.int64).reshape(-1, 2))
            self._graph, self._graph_edges = None, -1
            return
        # number_of_edges() is O(N) in networkx but far cheaper than re-indexing.
        if topology is self._graph and topology.number_of_edges() == self._graph_edges:
            return
        index = self.index
        count = 2 * topology.number_of_edges()
        try:
            flat = np.fromiter((index[node] for edge in topology.edges() for node in edge), np.int64, count)
        except KeyError as exc:
            raise unknown("agent in topology", str(exc.args[0]), self.agents) from None
        self._set_edges(flat.reshape(-1, 2))
        self._graph, self._graph_edges = topology, topology.number_of_edges()

    def _set_edges(self, edges: np.ndarray) -> None:
        edges = edges[edges[:, 0] != edges[:, 1]]  # self-loops carry nothing
        src = np.concatenate([edges[:, 0], edges[:, 1]])
        dst = np.concatenate([edges[:, 1], edges[:, 0]])
        keys = np.unique(src * self.n + dst)
        self._link_keys = keys
        self._src, self._dst = keys // self.n, keys % self.n

    @property
    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Directed links (src, dst) of the current topology, both directions, sorted."""
        return self._src, self._dst

    def graph(self) -> nx.Graph:
        """The current topology as an undirected ``networkx.Graph`` over the agent ids."""
        g = nx.Graph()
        g.add_nodes_from(self.agents)
        one_way = self._src < self._dst
        g.add_edges_from(
            (self.agents[u], self.agents[v]) for u, v in zip(self._src[one_way].tolist(), self._dst[one_way].tolist())
        )
        return g

    def degree(self) -> np.ndarray:
        """(N,) number of topology neighbours of each agent."""
        return np.bincount(self._src, minlength=self.n)

    def has_link(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """Vectorised: is there a topology link from each ``src`` to each ``dst``?"""
        keys = np.asarray(src, dtype=np.int64) * self.n + np.asarray(dst, dtype=np.int64)
        if len(self._link_keys) == 0:
            return np.zeros(keys.shape, dtype=bool)
        pos = np.minimum(np.searchsorted(self._link_keys, keys), len(self._link_keys) - 1)
        return self._link_keys[pos] == keys

    # -- sending ------------------------------------------------------------------------------

    def send_neighbours(self, payloads: np.ndarray, senders: np.ndarray | None = None) -> Delivery:
        """Every agent (or those with ``senders[i]``) sends its row of ``payloads`` to each neighbour."""
        src, dst = self._src, self._dst
        if senders is not None:
            keep = np.asarray(senders, dtype=bool)[src]
            src, dst = src[keep], dst[keep]
        return self._transmit(src, dst, payloads, by_row=True, check_links=False)

    def send_broadcast(self, payloads: np.ndarray, senders: np.ndarray | None = None) -> Delivery:
        """Every agent (or those with ``senders[i]``) sends its row to every other agent."""
        n = self.n
        sender_idx = np.arange(n) if senders is None else np.flatnonzero(senders)
        src = np.repeat(sender_idx, n - 1)
        offsets = np.tile(np.arange(1, n), len(sender_idx))
        dst = (src + offsets) % n
        return self._transmit(src, dst, payloads, by_row=True, check_links=False)

    def send(self, src: np.ndarray, dst: np.ndarray, payload: np.ndarray) -> Delivery:
        """Point-to-point: message ``m`` carries ``payload[m]`` from ``src[m]`` to ``dst[m]``.

        Messages to an agent that is not a topology neighbour are sent but lost (no link).
        """
        src = np.asarray(src, dtype=np.int64)
        dst = np.asarray(dst, dtype=np.int64)
        return self._transmit(src, dst, payload, by_row=False, check_links=True)

    def idle(self, payload_size: int = 0) -> Delivery:
        """Send nothing this step (messages in the delay line still arrive)."""
        empty = np.zeros(0, dtype=np.int64)
        return self._transmit(empty, empty, np.zeros((0, payload_size)), by_row=False, check_links=False)

    def _transmit(
        self,
        src: np.ndarray,
        dst: np.ndarray,
        payload: np.ndarray,
        *,
        by_row: bool,
        check_links: bool,
        delay: int | None = None,
    ) -> Delivery:
        payload = np.asarray(payload, dtype=np.float64)
        if payload.ndim == 1:
            payload = payload[:, None] if not by_row else payload.reshape(self.n, -1)
        p = payload.shape[1]
        c = self.counters
        size = message_bytes(p, self.spec.bits)

        # A crashed agent transmits nothing; nothing is counted for it.
        live = ~self.crashed[src]
        src, dst = src[live], dst[live]
        rows = src if by_row else np.flatnonzero(live)

        # Byte budget: an agent's messages beyond budget // size this step are refused.
        if self.spec.budget is not None and len(src):
            allowed = self.spec.budget // size
            order = np.argsort(src, kind="stable")
            rank = np.empty(len(src), dtype=np.int64)
            s_sorted = src[order]
            starts = np.r_[0, np.flatnonzero(s_sorted[1:] != s_sorted[:-1]) + 1]
            run_start = np.repeat(starts, np.diff(np.r_[starts, len(src)]))
            rank[order] = np.arange(len(src)) - run_start
            ok = rank < allowed
            c.over_budget_msgs += np.bincount(src[~ok], minlength=self.n)
            src, dst, rows = src[ok], dst[ok], rows[ok]

        n_sent = len(src)
        sent_per = np.bincount(src, minlength=self.n)
        c.sent_msgs += sent_per
        c.sent_bytes += sent_per * size

        lost = self.rng.random(n_sent) < self.spec.drop if self.spec.drop > 0 else np.zeros(n_sent, bool)
        if check_links:
            lost |= ~self.has_link(src, dst)
        keep = ~lost
        src_k, dst_k, rows_k = src[keep], dst[keep], rows[keep]
        # Quantise once per source row when all messages of a sender carry the same row.
        if by_row:
            q = quantise(payload, self.spec.bits) if p else payload
            data = q[rows_k]
        else:
            data = quantise(payload[rows_k], self.spec.bits) if p else payload[rows_k]
        dropped_per = np.bincount(src[lost], minlength=self.n)

        # Delay line: deliver what was sent ``delay`` steps ago (now, when delay == 0).
        delay = self.spec.delay if delay is None else delay
        self._pending.append((self.t + delay, src_k, dst_k, data))
        due = [m for m in self._pending if m[0] <= self.t]
        self._pending = [m for m in self._pending if m[0] > self.t]
        if len(due) == 1:
            _, d_src, d_dst, d_data = due[0]
        elif due:
            d_src = np.concatenate([m[1] for m in due])
            d_dst = np.concatenate([m[2] for m in due])
            d_data = np.concatenate([m[3] for m in due])
        else:
            d_src = d_dst = np.zeros(0, dtype=np.int64)
            d_data = np.zeros((0, p))
        # A receiver that is crashed when the message arrives gets nothing.
        dead = self.crashed[d_dst]
        if dead.any():
            dropped_per += np.bincount(d_src[dead], minlength=self.n)
            d_src, d_dst, d_data = d_src[~dead], d_dst[~dead], d_data[~dead]
        d_size = message_bytes(d_data.shape[1], self.spec.bits)
        delivered_per = np.bincount(d_dst, minlength=self.n)
        c.delivered_msgs += delivered_per
        c.delivered_bytes += delivered_per * d_size
        c.dropped_msgs += dropped_per
        c.dropped_bytes += dropped_per * size
        self.step_log.append((n_sent, len(d_src), int(dropped_per.sum()), n_sent * size, len(d_src) * d_size))
        self.t += 1
        return Delivery(d_src, d_dst, d_data, self.n)

    def delivery_mask(self, payload_size: int, mode: str = "neighbours") -> np.ndarray:
        """This step's ``N x N`` delivery mask for a learned protocol (``mask[i, j]``: j -> i).

        ``mode`` is ``"neighbours"`` (topology links) or ``"broadcast"`` (all pairs). Loss,
        crashes, budget and byte accounting apply as for real messages; the payload itself is
        the learned protocol's (quantise it with :func:`quantise` if wanted). Delay does not
        apply to masks: a learned protocol sees this step's links.
        """
        if mode not in ("neighbours", "broadcast"):
            raise unknown("delivery mask mode", mode, ["neighbours", "broadcast"])
        zeros = np.zeros((self.n, payload_size))
        if mode == "neighbours":
            src, dst = self._src, self._dst
        else:
            src = np.repeat(np.arange(self.n), self.n - 1)
            dst = (src + np.tile(np.arange(1, self.n), self.n)) % self.n
        out = self._transmit(src, dst, zeros, by_row=True, check_links=False, delay=0)
        return out.mask()

    # -- accounting ---------------------------------------------------------------------------

    def totals(self) -> dict[str, float]:
        """Totals since :meth:`reset`: messages and bytes sent, delivered, dropped; rates."""
        c = self.counters
        steps = max(self.t, 1)
        sent = int(c.sent_msgs.sum())
        delivered = int(c.delivered_msgs.sum())
        dropped = int(c.dropped_msgs.sum())
        return {
            "messages_sent": float(sent),
            "messages_delivered": float(delivered),
            "messages_dropped": float(dropped),
            "messages_over_budget": float(c.over_budget_msgs.sum()),
            "bytes_sent": float(c.sent_bytes.sum()),
            "bytes_delivered": float(c.delivered_bytes.sum()),
            "bytes_per_agent_step": float(c.sent_bytes.sum()) / (self.n * steps),
            "delivery_rate": delivery_rate(delivered, dropped, int(c.over_budget_msgs.sum())),
            "channel_steps": float(self.t),
        }
