"""Gradient synchronisation: every rank ends an update with the same averaged step.

One interface, :class:`GradientSync` with ``synchronize(params) -> bytes sent``, four methods
chosen by ``DistConfig.sync``:

* ``allreduce`` (default): gradients packed into fused fp32 buckets, each averaged with one
  buffer-based ``Allreduce(MPI.IN_PLACE, bucket)`` (no pickling, no copy inside mpi4py), optionally
  compressed (marl/distributed/compress.py) or overlapped with backward (``overlap``: a
  non-blocking ``Iallreduce`` is started from a grad hook as soon as a bucket is complete).
* ``ring``: our own ring allreduce over point-to-point ``Sendrecv``: reduce-scatter then
  allgather, each in size-1 steps (Patarasuk & Yuan, JPDC 2009; the Baidu/Horovod algorithm).
  Bandwidth-optimal: each rank sends 2(n-1)/n of the buffer.
* ``ps``: a parameter server on rank 0: ``Gather`` the buckets, average, ``Bcast`` the result.
* ``gossip`` and ``sync_every > 1``: gradients stay local (:class:`NoSync`); parameters are
  averaged between updates by :mod:`marl.distributed.averaging` (push-sum gossip, LocalSGD).
  :class:`GossipSync` (D-PSGD: mixing parameters with Metropolis-Hastings weights on a fixed graph
  at every optimiser step; Lian et al., NeurIPS 2017) is what ``make_sync`` returns for gossip
  outside training (``marl bench allreduce`` compares it); ``marl train`` uses push-sum.

Averaging without an averaging pass (``prescaled``; Horovod's ``prescale_factor``, Sergeev & Del
Balso 2018): dividing the summed bucket by the world size is a second full pass over memory, and
for a shared-memory allreduce that pass costs about as much as the reduction itself. A sync made
with ``prescaled=True`` that can exploit it (dense fp32 ``allreduce``) reports
``grad_scale == 1 / world size``; the training loop multiplies its loss by ``sync.grad_scale``
before ``backward`` (free: a scalar on the loss), so ``Allreduce(SUM)`` directly yields the mean and
the gradients after ``synchronize`` are exactly what they were with averaging (same clipping,
same optimiser step). Every other method (ring, ps, gossip, compressors) averages by itself and
reports ``grad_scale == 1.0``. ``grad_scale`` is read per backward, because a ULFM recovery shrinks
the world (n -> n-1 ranks) and the factor must follow.

Bytes on the wire are counted per rank and update from the algorithm's message pattern: a ring
allreduce of B bytes sends 2(n-1)/n·B (what Open MPI's large-message allreduce sends too), an
allgather (n-1)·B, the server sends (n-1)·B and a worker B, gossip B per neighbour.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from marl.distributed.buckets import Bucket, make_buckets
from marl.distributed.compress import Compressor, NoCompression, make_compressor
from marl.distributed.config import DistConfig
from marl.distributed.world import MPIWorld, World

__all__ = [
    "GradientSync",
    "NoSync",
    "AllreduceSync",
    "RingSync",
    "ParameterServerSync",
    "GossipSync",
    "MPICollectives",
    "metropolis_weights",
    "make_sync",
]


class MPICollectives:
    """Buffer-based collectives on the world's current communicator (failures -> RankFailure)."""

    def __init__(self, world: MPIWorld) -> None:
        self.world = world
        self.MPI = world.MPI

    @property
    def size(self) -> int:
        return self.world.size

    def allreduce_sum_(self, t: torch.Tensor) -> int:
        """Sum contiguous fp32 ``t`` over ranks in place; return bytes sent by this rank."""
        assert t.dtype == torch.float32 and t.is_contiguous()
        MPI = self.MPI
        self.world.call(self.world.comm.Allreduce, MPI.IN_PLACE, [t.numpy(), MPI.FLOAT], op=MPI.SUM)
        return ring_bytes(t.numel() * 4, self.size)

    def allreduce_mean_(self, t: torch.Tensor) -> int:
        """Average contiguous fp32 ``t`` over ranks in place (sum, then one division pass)."""
        sent = self.allreduce_sum_(t)
        t /= self.size
        return sent

    def allgather(self, payload: np.ndarray) -> np.ndarray:
        MPI = self.MPI
        out = np.empty((self.size, payload.nbytes), dtype=np.uint8)
        self.world.call(self.world.comm.Allgather, [payload, MPI.BYTE], [out, MPI.BYTE])
        return out


def ring_bytes(nbytes: int, size: int) -> int:
    """Bytes one rank sends in a bandwidth-optimal allreduce of ``nbytes``."""
    return (2 * (size - 1) * nbytes) // size


class GradientSync:
    """Averages ``p.grad`` in place across ranks. World size 1: a no-op that returns 0.

    Contract with the training loop: multiply the loss by :attr:`grad_scale` before ``backward``
    (read it every time: it changes when a recovery shrinks the world); after
    :meth:`synchronize` every ``p.grad`` is the mean over ranks of their *unscaled* gradients.
    Calling a sync is the same as calling :meth:`synchronize`.
    """

    name = "none"
    #: True for methods that can skip their averaging pass when the caller prescales the loss.
    supports_prescale = False

    def __init__(self, world: World, cfg: DistConfig, *, prescaled: bool = False) -> None:
        self.world = world
        self.cfg = cfg
        #: The caller scales its loss by ``grad_scale``, so a plain SUM over ranks is the mean.
        self.prescaled = bool(prescaled) and self.supports_prescale
        self.bucket_bytes = int(cfg.bucket_mb * 1e6)
        self.buckets: list[Bucket] = []
        self._key: tuple[Any, ...] = ()
        self._generation = world.generation
        #: Bytes sent by this rank in the last synchronize() and in total.
        self.last_bytes = 0
        self.total_bytes = 0

    @property
    def grad_scale(self) -> float:
        """Factor the caller applies to its loss before ``backward``: ``1 / world size`` in
        prescaled mode (the sync then only sums), else 1.0 (the sync averages by itself)."""
        return 1.0 / self.world.size if self.prescaled else 1.0

    def __call__(self, params: list[torch.nn.Parameter]) -> int:
        return self.synchronize(params)

    def synchronize(self, params: list[torch.nn.Parameter]) -> int:
        """Average the gradients of ``params`` over ranks in place; return bytes sent.

        In prescaled mode the gradients must already carry the factor :attr:`grad_scale`.
        """
        if self.world.size == 1:
            return 0
        params = [p for p in params if p.requires_grad]
        if self.world.generation != self._generation:  # a recovery happened: fresh state
            self._generation = self.world.generation
            self.reset()
        key = tuple((id(p), p.shape, p.dtype) for p in params)
        if key != self._key:
            self._key = key
            self.buckets = make_buckets(params, self.bucket_bytes)
            self.on_layout(params)
        sent = self._sync()
        self.last_bytes = sent
        self.total_bytes += sent
        return sent

    def reset(self) -> None:
        """Drop state bound to the old communicator (called after a recovery)."""

    def on_layout(self, params: list[torch.nn.Parameter]) -> None:
        """Called when the bucket layout is (re)built."""

    def _sync(self) -> int:
        raise NotImplementedError


class NoSync(GradientSync):
    """World size 1."""

    def _sync(self) -> int:
        return 0


class AllreduceSync(GradientSync):
    """Fused-bucket averaging with in-place Allreduce; optional compression and overlap.

    Uncompressed, it supports ``prescaled``: one in-place ``Allreduce(SUM)`` per bucket and
    nothing else (with ``.grad`` already views into the buckets, not even a copy). Compressors
    average themselves (their error-feedback residuals live in unscaled units), so with one the
    sync keeps ``grad_scale == 1``.
    """

    name = "allreduce"
    world: MPIWorld  # these methods talk MPI: only built for an MPIWorld (make_sync)

    def __init__(
        self, world: MPIWorld, cfg: DistConfig, compressor: Compressor | None = None, *, prescaled: bool = False
    ) -> None:
        self.compressor = compressor or NoCompression()
        self.supports_prescale = isinstance(self.compressor, NoCompression)
        super().__init__(world, cfg, prescaled=prescaled)
        self.coll = MPICollectives(world)
        self.overlap = cfg.overlap
        self._hooks: list[Any] = []
        self._requests: dict[int, Any] = {}
        self._next_launch = 0
        self._stale = False
        self._owner: dict[int, tuple[int, int]] = {}

    def reset(self) -> None:
        self.compressor.reset()
        self._requests.clear()
        self._next_launch = 0
        for b in self.buckets:
            b.ready.clear()

    # -- overlap: start a bucket's Iallreduce from the grad hook of its last parameter --------
    def on_layout(self, params: list[torch.nn.Parameter]) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._owner = {id(p): (b.index, i) for b in self.buckets for i, p in enumerate(b.params)}
        if self.overlap:
            for p in params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_ready))

    def _grad_ready(self, p: torch.nn.Parameter) -> None:
        b_index, i = self._owner[id(p)]
        bucket = self.buckets[b_index]
        if i in bucket.ready or b_index < self._next_launch:
            # A second backward before synchronize() (gradient accumulation): the launched
            # reduction is outdated; synchronize() will redo every bucket.
            self._stale = True
            return
        bucket.ready.add(i)
        # Launch in bucket order only, so every rank issues the same sequence of collectives.
        while (
            not self._stale
            and self._next_launch < len(self.buckets)
            and len(self.buckets[self._next_launch].ready) == len(self.buckets[self._next_launch].params)
        ):
            self._launch(self.buckets[self._next_launch])
            self._next_launch += 1

    def _launch(self, bucket: Bucket) -> None:
        MPI = self.world.MPI
        bucket.pack_grads()
        self._requests[bucket.index] = self.world.call(
            self.world.comm.Iallreduce, MPI.IN_PLACE, [bucket.buffer.numpy(), MPI.FLOAT], op=MPI.SUM
        )

    def _sync(self) -> int:
        if not self.overlap:
            sent = 0
            for bucket in self.buckets:
                bucket.pack_grads()
                if self.prescaled:  # the hot path: the SUM of prescaled grads is the mean
                    sent += self.coll.allreduce_sum_(bucket.buffer)
                else:
                    sent += self.compressor.reduce_(bucket, self.coll)
                bucket.unpack_grads()
            return sent
        try:
            if self._stale:  # finish what is in flight, then start over with the final grads
                for req in self._requests.values():
                    self.world.call(req.Wait)
                self._requests.clear()
                self._next_launch = 0
            for bucket in self.buckets[self._next_launch :]:
                self._launch(bucket)
            sent = 0
            for bucket in self.buckets:
                self.world.call(self._requests[bucket.index].Wait)
                if not self.prescaled:
                    bucket.buffer /= self.world.size
                bucket.unpack_grads()
                sent += ring_bytes(bucket.numel * 4, self.world.size)
            return sent
        finally:
            self._requests.clear()
            self._next_launch = 0
            self._stale = False
            for b in self.buckets:
                b.ready.clear()


class RingSync(GradientSync):
    """Our own ring allreduce: reduce-scatter + allgather over Sendrecv with the neighbours."""

    name = "ring"
    world: MPIWorld  # these methods talk MPI: only built for an MPIWorld (make_sync)

    def _sync(self) -> int:
        sent = 0
        for bucket in self.buckets:
            bucket.pack_grads()
            sent += self.ring_allreduce_mean_(bucket.buffer)
            bucket.unpack_grads()
        return sent

    def ring_allreduce_mean_(self, t: torch.Tensor) -> int:
        world = self.world
        MPI, comm, n, r = world.MPI, world.comm, world.size, world.rank
        data = t.numpy()
        # n nearly equal chunks; chunk c is owned (fully reduced) by rank (c - 1) mod n after
        # the reduce-scatter phase.
        bounds = np.linspace(0, data.size, n + 1).astype(np.int64)
        chunk = lambda c: data[bounds[c % n] : bounds[c % n + 1]]
        right, left = (r + 1) % n, (r - 1) % n
        scratch = np.empty(int(np.max(np.diff(bounds))), dtype=np.float32)
        sent = 0
        for step in range(n - 1):  # reduce-scatter
            out, inc = chunk(r - step), chunk(r - step - 1)
            recv = scratch[: inc.size]
            world.call(comm.Sendrecv, [out, MPI.FLOAT], right, 17, [recv, MPI.FLOAT], left, 17)
            inc += recv
            sent += out.nbytes
        for step in range(n - 1):  # allgather of the reduced chunks
            out, inc = chunk(r + 1 - step), chunk(r - step)
            world.call(comm.Sendrecv, [out, MPI.FLOAT], right, 18, [inc, MPI.FLOAT], left, 18)
            sent += out.nbytes
        t /= n
        return sent


class ParameterServerSync(GradientSync):
    """Rank 0 gathers every rank's bucket, averages and broadcasts the mean."""

    name = "ps"
    world: MPIWorld  # these methods talk MPI: only built for an MPIWorld (make_sync)

    def _sync(self) -> int:
        world = self.world
        MPI, comm, n = world.MPI, world.comm, world.size
        root = world.rank == 0
        sent = 0
        for bucket in self.buckets:
            bucket.pack_grads()
            data = bucket.buffer.numpy()
            gathered = np.empty((n, data.size), dtype=np.float32) if root else None
            world.call(comm.Gather, [data, MPI.FLOAT], [gathered, MPI.FLOAT] if root else None, root=0)
            if gathered is not None:  # the root
                np.mean(gathered, axis=0, out=data)
            world.call(comm.Bcast, [data, MPI.FLOAT], root=0)
            bucket.unpack_grads()
            sent += data.nbytes * (n - 1) if root else data.nbytes
        return sent


def metropolis_weights(graph: Any, node: Any) -> dict[Any, float]:
    """Metropolis-Hastings mixing weights of ``node``: w_ij = 1 / (1 + max(d_i, d_j)) for each
    neighbour j, w_ii = 1 - sum_j w_ij. Symmetric and doubly stochastic, so repeated mixing on a
    connected graph converges to the average (Xiao & Boyd, Systems & Control Letters 2004)."""
    d_i = graph.degree(node)
    weights = {j: 1.0 / (1 + max(d_i, graph.degree(j))) for j in graph.neighbors(node) if j != node}
    weights[node] = 1.0 - sum(weights.values())
    return weights


class GossipSync(GradientSync):
    """D-PSGD: mix parameters with topology neighbours; gradients stay local."""

    name = "gossip"
    world: MPIWorld  # these methods talk MPI: only built for an MPIWorld (make_sync)

    def __init__(self, world: MPIWorld, cfg: DistConfig, topology: Any = None) -> None:
        super().__init__(world, cfg)
        self.user_topology = topology
        self._graph_size = -1
        self.graph: Any = None
        self.weights: dict[int, float] = {}

    def _graph(self) -> Any:
        import networkx as nx

        n = self.world.size
        if self._graph_size != n:
            g = self.user_topology
            if g is None or set(g.nodes) != set(range(n)):
                # Default, and for a graph that is not over ranks 0..n-1 (e.g. a scenario's agent
                # graph, or the user's graph after a shrink removed a rank): a ring of ranks.
                g = nx.cycle_graph(n) if n > 2 else nx.path_graph(n)
            if not nx.is_connected(g):
                from marl.core.errors import ConfigError

                raise ConfigError(f"bad gossip topology: a graph over {n} ranks that is not connected")
            self.graph, self._graph_size = g, n
            self.weights = metropolis_weights(g, self.world.rank)
        return self.graph

    def reset(self) -> None:
        self._graph_size = -1

    def _sync(self) -> int:
        self._graph()
        world = self.world
        MPI, comm, me = world.MPI, world.comm, world.rank
        neighbours = sorted(j for j in self.weights if j != me)
        sent = 0
        for bucket in self.buckets:
            bucket.pack_params()
            data = bucket.buffer.numpy()
            recv = {j: np.empty_like(data) for j in neighbours}
            requests = []
            for j in neighbours:
                requests.append(world.call(comm.Irecv, [recv[j], MPI.FLOAT], source=j, tag=19))
                requests.append(world.call(comm.Isend, [data, MPI.FLOAT], dest=j, tag=19))
            world.call(MPI.Request.Waitall, requests)
            mixed = self.weights[me] * data
            for j in neighbours:
                mixed += self.weights[j] * recv[j]
            data[:] = mixed
            bucket.unpack_params()
            sent += data.nbytes * len(neighbours)
        return sent


def make_sync(
    world: World, cfg: DistConfig, topology: Any = None, *, prescaled: bool = False, training: bool = False
) -> GradientSync:
    """The gradient sync chosen by ``cfg.sync``.

    ``topology`` matters for gossip only: a connected networkx graph whose nodes are the ranks
    0..n-1. Any other graph (None, or a scenario's graph over agent names) means a ring of ranks.

    ``training=True`` (``marl train``): with ``sync=gossip`` or ``sync_every > 1`` gradients stay
    local (:class:`NoSync`); the parameters are averaged between updates by
    :mod:`marl.distributed.averaging` (push-sum gossip, LocalSGD). Otherwise ``gossip`` is the
    per-step D-PSGD :class:`GossipSync` (the allreduce bench compares it).

    ``prescaled=True`` is a promise that the caller multiplies its loss by ``sync.grad_scale``
    before every ``backward`` (what ``marl train`` does); methods that can use it then skip their
    averaging pass. The default (False) keeps ``grad_scale == 1`` for callers that do not scale,
    so forgetting it is slower, never wrong.
    """
    if not isinstance(world, MPIWorld) or (training and (cfg.sync == "gossip" or cfg.sync_every > 1)):
        return NoSync(world, cfg)
    if cfg.sync == "allreduce":
        return AllreduceSync(world, cfg, make_compressor(cfg.compressor), prescaled=prescaled)
    if cfg.sync == "ring":
        return RingSync(world, cfg)
    if cfg.sync == "ps":
        return ParameterServerSync(world, cfg)
    if cfg.sync == "gossip":
        return GossipSync(world, cfg, topology)
    raise ValueError(cfg.sync)  # DistConfig validated it already
