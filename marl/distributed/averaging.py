"""Parameter averaging between updates: LocalSGD over allreduce, and root-free push-sum gossip.

``--sync-every K`` (LocalSGD, Stich 2019; DiLoCo, Douillard et al. 2023, without the outer
optimiser): every rank makes K updates on its own gradients, then one averaging round of the
*parameters* (optimiser state stays local). The training loop calls an averager after every
update; it does its round when ``update % K == 0`` and returns the bytes this rank sent.

* :class:`NoAverager`: ``--sync allreduce`` with K = 1: gradients are averaged at every optimiser
  step by :mod:`marl.distributed.sync`, so parameters never drift and there is nothing to do.
* :class:`AllreduceAverager`: ``--sync allreduce --sync-every K`` (K > 1): one fused fp32
  ``Allreduce`` of the parameters, divided by the world size. Every rank ends the round with
  bit-identical parameters. A peer's death raises :class:`RankFailure` to the loop, which recovers
  (ULFM shrink, lowest survivor's state) and calls again.
* :class:`PushSumGossip`: ``--sync gossip``: push-sum (Kempe et al., FOCS 2003) over a
  time-varying one-peer exponential graph of ranks (Stochastic Gradient Push; Assran et al.,
  ICML 2019). Each rank holds its parameters ``z`` and a weight ``w`` (1 at the start); in round
  ``t`` it keeps half of its mass ``(z w, w)`` and sends the other half to rank
  ``(r + 2^(t mod log2 n)) mod n`` with one ``Isend``, receiving one half from
  ``(r - 2^(t mod log2 n)) mod n`` with one ``Irecv``; then ``z = s / w``. The mass ``sum(z w)``
  and the weight ``sum(w)`` are conserved, so every ``z`` is a convex combination of the ranks'
  parameters whose weights converge to the plain average (the weights correct the bias a
  directed graph would give). No rank is special and nothing is collective over all ranks: a rank
  sends one model and receives one per round, ``B + 4`` bytes, against ``2(n-1)/n B`` per
  optimiser step for a gradient allreduce.

Failures in gossip (``--fault-tolerance ulfm``): a dead peer makes the ``Isend``/``Irecv``
fail (ULFM's failure detector: the runtime's heartbeat, or at once when the peer's socket
closes), the rank revokes the communicator so every survivor notices at its next round, and the
survivors shrink it (ULFM's fault-tolerant agreement decides who is alive; there is no root and no
parameter broadcast: each survivor keeps its own parameters and weight). The dead rank's mass is
dropped, which leaves the average over the survivors a convex combination of their parameters.
A survivor that had already finished the interrupted round and started the next is at most a
round or two ahead of one that had not; after the shrink the survivors take the largest round
number among them (one ``Allreduce(MAX)`` of an integer, part of the recovery, not of the
averaging), the ranks behind keep their own mass for the rounds they missed (no exchange, no
deadlock) and everybody meets again in that round on the new graph. A round that failed on a
rank is undone there: it keeps its whole mass and ignores what it may have received.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from marl.distributed.config import DistConfig
from marl.distributed.sync import ring_bytes
from marl.distributed.world import MPIWorld, RankFailure, World

__all__ = ["ParameterAverager", "NoAverager", "AllreduceAverager", "PushSumGossip", "make_averager", "push_sum_peer"]

#: MPI tag of push-sum messages (distinct from the gradient syncs' tags 17-19).
PUSH_SUM_TAG = 23


def push_sum_peer(rank: int, size: int, round_: int) -> tuple[int, int]:
    """(send to, receive from) of ``rank`` in push-sum round ``round_`` over ``size`` ranks:
    the one-peer exponential graph, offset ``2^(round mod ceil(log2 size))``. Over
    ``ceil(log2 size)`` consecutive rounds every rank's mass reaches every other rank."""
    if size < 2:
        return rank, rank
    hops = max(1, math.ceil(math.log2(size)))
    offset = 2 ** (round_ % hops)
    return (rank + offset) % size, (rank - offset) % size


def _flat_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.dtype.is_floating_point]


def _pack(params: list[torch.nn.Parameter], extra: int = 0) -> torch.Tensor:
    """The parameters as one contiguous fp32 vector (plus ``extra`` trailing slots)."""
    flat = torch.empty(sum(p.numel() for p in params) + extra, dtype=torch.float32)
    offset = 0
    for p in params:
        n = p.numel()
        flat[offset : offset + n] = p.detach().reshape(-1).float()
        offset += n
    return flat


def _unpack(flat: torch.Tensor, params: list[torch.nn.Parameter]) -> None:
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view(p.shape).to(p.dtype))
            offset += n


class ParameterAverager:
    """Called after every update; averages parameters every ``K`` updates; returns bytes sent."""

    #: True when training must not use collectives over all ranks (the loop then logs this
    #: rank's own metrics and writes checkpoints without an agreement round).
    root_free = False

    def __init__(self, world: World, cfg: DistConfig) -> None:
        self.world, self.every = world, int(cfg.sync_every)
        self.total_bytes = 0

    def __call__(self, model: torch.nn.Module, update: int) -> int:
        """After update ``update`` (1-based): one averaging round when it is due."""
        if self.world.size == 1 or update % self.every:
            return 0
        sent = self.average(_flat_params(model))
        self.total_bytes += sent
        return sent

    def average(self, params: list[torch.nn.Parameter]) -> int:
        return 0


class NoAverager(ParameterAverager):
    """Allreduce with K = 1 (gradients already averaged per step), or one rank."""


class AllreduceAverager(ParameterAverager):
    """LocalSGD: the mean of every rank's parameters, with one fused Allreduce."""

    world: MPIWorld

    def average(self, params: list[torch.nn.Parameter]) -> int:
        MPI, world = self.world.MPI, self.world
        flat = _pack(params)
        world.call(world.comm.Allreduce, MPI.IN_PLACE, [flat.numpy(), MPI.FLOAT], op=MPI.SUM)
        flat /= world.size
        _unpack(flat, params)
        return ring_bytes(flat.numel() * 4, world.size)


class PushSumGossip(ParameterAverager):
    """Root-free push-sum over the one-peer exponential graph; survives dead peers (ULFM)."""

    root_free = True
    world: MPIWorld

    def __init__(self, world: MPIWorld, cfg: DistConfig) -> None:
        super().__init__(world, cfg)
        #: Push-sum weight of this rank (its share of the total; the sum over ranks is conserved).
        self.weight = 1.0
        #: Index of the next averaging round (the same sequence on every rank).
        self.round = 0
        #: After a recovery, rounds before this one are skipped (the survivors ahead finished them).
        self.skip_until = 0
        #: Rounds this rank skipped or lost to failures (for the records and the chaos bench).
        self.rounds_lost = 0
        self.recovery_seconds: list[float] = []

    def average(self, params: list[torch.nn.Parameter]) -> int:
        while True:
            this = self.round
            if this < self.skip_until:  # the others did this round while we had not noticed the failure
                self.round += 1
                self._lose_round()
                return 0
            try:
                sent = self._round(params, this)
                self.round += 1
                return sent
            except RankFailure:
                if not self.world.ulfm:
                    raise
                target = self._recover(this)
                if this < target:  # others are one round further: keep our mass for this one
                    self.skip_until = target
                    self.round += 1
                    self._lose_round()
                    return 0
                # this == target: retry the round on the survivors' graph

    def _lose_round(self) -> None:
        """Count a round this rank did without exchange (also on the latest failure event, which
        the manifest holds: ``gossip_rounds_skipped``, summed over the ranks that log it)."""
        self.rounds_lost += 1
        if self.world.events:
            event = self.world.events[-1]
            event["gossip_rounds_skipped"] = int(event.get("gossip_rounds_skipped", 0)) + 1

    def _round(self, params: list[torch.nn.Parameter], round_: int) -> int:
        world, MPI = self.world, self.world.MPI
        dest, source = push_sum_peer(world.rank, world.size, round_)
        z = _pack(params, extra=1)
        half = 0.5 * self.weight
        out = z * half  # (z w / 2, w / 2): the half we give away ...
        out[-1] = half
        inc = torch.empty_like(out)
        requests = [
            world.call(world.comm.Irecv, [inc.numpy(), MPI.FLOAT], source=source, tag=PUSH_SUM_TAG),
            world.call(world.comm.Isend, [out.numpy(), MPI.FLOAT], dest=dest, tag=PUSH_SUM_TAG),
        ]
        for request in requests:  # one by one: Waitall reports a dead peer as ERR_IN_STATUS
            world.call(request.Wait)
        # ... and the half we keep equals the half we gave away: s = z w / 2 + s_in, w = w / 2 + w_in.
        mass = out + inc
        self.weight = float(mass[-1])
        z = mass[:-1] / self.weight
        _unpack(z, params)
        return out.numel() * 4

    def _recover(self, failed_round: int) -> int:
        """Shrink to the survivors (no state broadcast) and agree on the round to meet in."""
        start = time.perf_counter()
        world, MPI = self.world, self.world.MPI
        while True:
            world.recover(None, None)
            mine = np.array([failed_round], dtype=np.int64)
            try:
                world.call(world.comm.Allreduce, MPI.IN_PLACE, [mine, MPI.INT64_T], op=MPI.MAX)
                break
            except RankFailure:
                continue
        self.recovery_seconds.append(time.perf_counter() - start)
        for event in self.world.events:
            event.setdefault("gossip_round", int(mine[0]))
        return int(mine[0])


def make_averager(world: World, cfg: DistConfig) -> ParameterAverager:
    """The averager for ``cfg``: push-sum for gossip, LocalSGD allreduce for K > 1, else none."""
    if not isinstance(world, MPIWorld):
        return NoAverager(world, cfg)
    if cfg.sync == "gossip":
        return PushSumGossip(world, cfg)
    if cfg.sync_every > 1:
        return AllreduceAverager(world, cfg)
    return NoAverager(world, cfg)


def averaged_locally(cfg: Any) -> bool:
    """True when gradients stay on their rank (gossip, or K > 1): the gradient sync is a no-op."""
    return cfg.sync == "gossip" or cfg.sync_every > 1
