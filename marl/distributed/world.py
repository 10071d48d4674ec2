"""The group of training processes: who am I, how many are we, and what to do when one dies.

:func:`init_world` returns a :class:`World`. With one process it is a :class:`LocalWorld` whose
methods are no-ops and mpi4py is never imported. Under MPI it is an :class:`MPIWorld` that wraps
a duplicate of ``COMM_WORLD`` and talks only through buffer-based (upper-case) mpi4py calls.

Fault tolerance with ULFM (User-Level Failure Mitigation; Bland et al., "Post-failure recovery
of MPI communication capability", IJHPCA 2013): when a peer dies, the next collective on a
survivor raises ``MPI.Exception`` of class ``ERR_PROC_FAILED`` or ``ERR_REVOKED``. We turn that
into :class:`RankFailure`; the training loop then calls :meth:`World.recover`, which revokes the
communicator (so every survivor stops waiting on it), shrinks it to the survivors, agrees on the
last update everybody completed, and re-broadcasts parameters and optimiser state from the
lowest surviving rank, so that the survivors continue from identical state with n-1 ranks.

Growing back (``cfg.respawn``): :meth:`MPIWorld.respawn`, called between updates, spawns one
process per lost rank with ``MPI_Comm_spawn`` (the same command line plus ``--respawned``) and
merges the intercommunicator, survivors first; the newcomer joins in its constructor through
``Comm.Get_parent()`` and learns from rank 0 whom it replaces. The training state travels in
:mod:`marl.training.elastic`. Push-sum gossip calls ``recover(None)``: shrink without a broadcast
(:mod:`marl.distributed.averaging`).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from datetime import UTC
from typing import Any

import numpy as np
import torch

from marl.core.errors import ConfigError
from marl.distributed.config import DistConfig

__all__ = ["World", "LocalWorld", "MPIWorld", "RankFailure", "RanksDivergedError", "init_world"]


#: How long ``--inject-failure R:U:log`` stalls rank R before killing it (its peers run ahead).
LOG_STALL_SECONDS = 4.0


class RankFailure(Exception):
    """A peer rank died during a collective (ULFM). Catch it, call ``world.recover(model, opt)``
    and redo the update."""


class RanksDivergedError(RuntimeError):
    """Ranks that must hold identical parameters do not (a bug, or different start weights)."""


def _state_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers in a fixed order (state_dict tensors share the module's storage)."""
    return [t for t in model.state_dict().values() if isinstance(t, torch.Tensor)]


def _digest(tensors: list[torch.Tensor]) -> int:
    """A 62-bit checksum of the tensors' shapes, dtypes and exact bytes."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 2


class World:
    """The training processes. Subclasses: LocalWorld (size 1), MPIWorld (under mpiexec)."""

    rank: int = 0
    size: int = 1
    #: Recovery events, one dict per failed rank: event, rank (original MPI rank), update,
    #: seconds_lost (from the start of the interrupted update to resumed training),
    #: recovery_seconds (from detection to resumed training), world_size_after.
    events: list[dict[str, Any]]

    def __init__(self, cfg: DistConfig) -> None:
        self.cfg = cfg
        self.events = []
        self.lost = []
        #: check_identical() calls that found every rank bit-identical (the manifest reports it).
        self.identical_checks = 0
        #: True in a process spawned by ``--respawn`` to replace a lost rank.
        self.newcomer = False
        self.siblings: set[int] = set()
        #: Incremented by every recovery; gradient syncs reset their per-communicator state.
        self.generation = 0
        self._update = -1
        self._update_start = time.perf_counter()

    @property
    def is_root(self) -> bool:
        """Rank 0 of the current world: the only rank that writes files. After rank 0 dies (ULFM),
        the lowest survivor becomes rank 0 of the shrunk world and takes the writing over."""
        return self.rank == 0

    def maybe_inject_failure(self, update: int, point: str = "update") -> None:
        """Kill this process with SIGKILL if ``cfg.inject_failure`` has a point
        ``"<my rank>:<update>"`` (``point`` "update": called as the update starts) or
        ``"<my rank>:<update>:checkpoint"`` (``point`` "checkpoint": called by the checkpoint writer
        with its file half written) or ``"<my rank>:<update>:log"`` (``point`` "log": called before
        the rows of ``update`` are written; the process first stalls :data:`LOG_STALL_SECONDS`, so
        its peers run ahead). The spec may list several points (``"1:2,2:4"``), one per rank.

        At the start of an update, also marks it (used to measure the work a failure throws away).
        The rank is the original MPI rank, so "1:3" means the process started as rank 1, also after
        a ULFM shrink renumbered the survivors. A rank spawned by ``--respawn`` to replace it is
        never killed (so a point fires at most once).
        """
        if point == "update":
            self._update = update
            self._update_start = time.perf_counter()
        if (self.original_rank, update, point) in self.cfg.failures and not getattr(self, "newcomer", False):
            if point == "log":  # a slow writer: the peers go on as far as they can without it
                time.sleep(LOG_STALL_SECONDS)
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    @property
    def original_rank(self) -> int:
        return self.rank

    @property
    def seed_stream(self) -> int:
        """Which training-episode and action-sampling stream this process draws from: its rank,
        or for a rank spawned by ``--respawn`` ``original rank + N x respawn round`` (N: the
        world size at launch), so a replacement never replays the episodes of the rank it
        replaces or of an earlier replacement."""
        return self.rank

    #: Original ranks lost and not yet replaced (``--respawn`` replaces them between updates).
    lost: list[int]

    def respawn(self, update: int) -> list[dict[str, Any]]:
        """Spawn one rank per lost rank and merge them in (MPIWorld with ``cfg.respawn``) when
        ``update`` updates are complete (the numbering of ``maybe_inject_failure`` and of the
        failure events: the rows of both land on update ``update + 1``); returns the
        ``rank_rejoin`` events."""
        return []

    # -- collective operations; no-ops for one rank -------------------------------------------
    def broadcast_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Copy parameters, buffers and optimiser state from rank 0 to every rank."""

    def broadcast_text(self, text: str) -> str:
        """Rank 0's ``text`` on every rank (e.g. the run id that every rank must log under)."""
        return text

    def broadcast_json(self, value: Any) -> Any:
        """Rank 0's JSON-able ``value`` on every rank (other ranks may pass None)."""
        return value

    def check_identical(self, model: torch.nn.Module) -> None:
        """Raise RanksDivergedError unless every rank holds bit-identical parameters and buffers."""

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """The mean of each metric over ranks (every rank must pass the same keys)."""
        return {k: float(v) for k, v in metrics.items()}

    def agree(self, update: int) -> int:
        """The last update every live rank completed: the minimum of ``update`` over ranks."""
        return int(update)

    def commit(self, completed: bool) -> bool:
        """True when every rank completed the phase just run (``completed`` on this rank); under
        ULFM an agreement whose outcome is the same on every survivor (see MPIWorld.commit)."""
        return completed

    def recover(self, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Continue after a RankFailure with the survivors (ULFM only)."""
        raise RuntimeError("recover() called in a world without peers; nothing can have failed")

    def barrier(self) -> None:
        """Wait for every rank."""

    def close(self) -> None:
        """Barrier, then let MPI finalise (at interpreter exit)."""


class LocalWorld(World):
    """World size 1: training without MPI."""


class MPIWorld(World):
    """A rank of an MPI job. Only buffer-based (upper-case) mpi4py calls are used."""

    def __init__(self, cfg: DistConfig) -> None:
        super().__init__(cfg)
        from mpi4py import MPI

        self.MPI = MPI
        self.ulfm = cfg.fault_tolerance == "ulfm"
        self._failure_classes = {
            getattr(MPI, name)
            for name in ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED")
            if hasattr(MPI, name)
        }
        self._detected_at: float | None = None
        self._recovered = False
        self._lost_at: dict[int, float] = {}  # original rank -> when its death was detected
        #: Respawn rounds so far (every process of the job agrees on it; see :attr:`seed_stream`).
        self.respawns = 0
        #: The respawn round this process joined in (0: launched with the job).
        self.join_round = 0
        parent = MPI.Comm.Get_parent()
        if parent != MPI.COMM_NULL:  # spawned by the survivors of a failure (--respawn)
            self.newcomer = True
            self.comm: Any = parent.Merge(high=True)  # the survivors keep ranks 0..n-1; we come last
            self.comm.Set_errhandler(MPI.ERRORS_RETURN)
            self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
            # Who we replace, and the job's bookkeeping, from the survivors' rank 0 (respawn()).
            header = json.loads(self._bcast_bytes(None))
            self.world_ranks = [int(r) for r in header["world_ranks"]]
            self.original_size, self.respawns = int(header["original_size"]), int(header["respawns"])
            self.generation, self.join_round = int(header["generation"]), self.respawns
            self._original_rank = self.world_ranks[self.rank]
            #: Original ranks spawned together with this one (one spawned job; they finalise together).
            self.siblings = {int(r) for r in header["joined"]}
            return
        self.comm = MPI.COMM_WORLD.Dup()  # an Intracomm; a Comm after a ULFM shrink
        # mpi4py raises MPI.Exception on errors (ERRORS_RETURN); ULFM needs that to survive.
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        #: The world size at launch: --respawn grows the world back to it.
        self.original_size = self.size
        #: Original MPI rank of each current rank (changes after a shrink).
        self.world_ranks = list(range(self.size))
        self._original_rank = self.rank

    @property
    def seed_stream(self) -> int:
        return self._original_rank + self.original_size * self.join_round

    @property
    def original_rank(self) -> int:
        return self._original_rank

    def call(self, fn, *args, **kwargs):
        """Run one MPI call; a peer's death becomes RankFailure (after revoking, under ULFM)."""
        try:
            return fn(*args, **kwargs)
        except self.MPI.Exception as exc:
            if self.ulfm and exc.Get_error_class() in self._failure_classes:
                if self._detected_at is None:
                    self._detected_at = time.perf_counter()
                # Make every survivor's pending operation on this communicator fail too.
                with contextlib.suppress(self.MPI.Exception):
                    self.comm.Revoke()
                raise RankFailure(f"rank {self.original_rank}: a peer died ({exc.Get_error_string()})") from exc
            raise

    # -- state ---------------------------------------------------------------------------------
    def _bcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """Broadcast a byte string from ``root`` (length first, then the bytes; no pickle)."""
        MPI = self.MPI
        n = np.array([len(data) if self.rank == root and data is not None else 0], dtype=np.int64)
        self.call(self.comm.Bcast, [n, MPI.INT64_T], root=root)
        buf = (
            np.frombuffer(bytearray(data or b""), dtype=np.uint8)
            if self.rank == root
            else np.empty(int(n[0]), np.uint8)
        )
        self.call(self.comm.Bcast, [buf, MPI.BYTE], root=root)
        return buf.tobytes()

    def _bcast_tensors(self, tensors: list[torch.Tensor], root: int = 0) -> None:
        """Overwrite ``tensors`` on every rank with root's, as raw bytes (exact for any dtype)."""
        MPI = self.MPI
        sizes = [t.numel() * t.element_size() for t in tensors]
        total = sum(sizes)
        check = np.array([total, -total], dtype=np.int64)
        self.call(self.comm.Allreduce, MPI.IN_PLACE, [check, MPI.INT64_T], op=MPI.MAX)
        if check[0] != -check[1]:
            raise RanksDivergedError(f"model state sizes differ between ranks ({-check[1]}..{check[0]} bytes)")
        buf = torch.empty(total, dtype=torch.uint8)
        if self.rank == root:
            offset = 0
            for t, n in zip(tensors, sizes):
                buf[offset : offset + n] = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                offset += n
        self.call(self.comm.Bcast, [buf.numpy(), MPI.BYTE], root=root)
        if self.rank != root:
            offset = 0
            with torch.no_grad():
                for t, n in zip(tensors, sizes):
                    src = buf[offset : offset + n].view(t.dtype).reshape(t.shape)
                    t.copy_(src)
                    offset += n

    def broadcast_state(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, root: int = 0
    ) -> None:
        self._bcast_tensors(_state_tensors(model), root)
        if optimizer is None:
            return
        # The optimiser's state (Adam moments, step counts) may exist only on root (e.g. after
        # --resume loaded it there), so its structure travels too: as JSON, never pickle.
        tensors: list[torch.Tensor] = []
        skeleton = None
        if self.rank == root:
            skeleton = json.dumps(_to_skeleton(optimizer.state_dict(), tensors)).encode()
        skeleton = json.loads(self._bcast_bytes(skeleton, root))
        if self.rank != root:
            tensors = []
            state = _from_skeleton(skeleton, tensors)
        self._bcast_tensors(tensors, root)
        if self.rank != root:
            optimizer.load_state_dict(state)

    def broadcast_text(self, text: str) -> str:
        return self._bcast_bytes(text.encode() if self.rank == 0 else None).decode()

    def broadcast_json(self, value: Any) -> Any:
        return json.loads(self._bcast_bytes(json.dumps(value).encode() if self.rank == 0 else None))

    def check_identical(self, model: torch.nn.Module) -> None:
        MPI = self.MPI
        d = _digest(_state_tensors(model))
        both = np.array([d, -d], dtype=np.int64)
        self.call(self.comm.Allreduce, MPI.IN_PLACE, [both, MPI.INT64_T], op=MPI.MAX)
        if both[0] == -both[1]:
            self.identical_checks += 1
        else:
            raise RanksDivergedError(
                f"parameters differ between ranks (checksum on rank {self.rank}: {d:x}); ranks "
                "must start from the same torch seed and apply the same synchronised updates"
            )

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        MPI = self.MPI
        keys = sorted(metrics)
        values = np.array([float(metrics[k]) for k in keys] + [float(len(keys))], dtype=np.float64)
        self.call(self.comm.Allreduce, MPI.IN_PLACE, [values, MPI.DOUBLE], op=MPI.SUM)
        if values[-1] != len(keys) * self.size:
            raise RanksDivergedError(f"ranks passed different metric sets to mean_metrics ({keys})")
        return {k: float(v / self.size) for k, v in zip(keys, values[:-1])}

    def agree(self, update: int) -> int:
        MPI = self.MPI
        value = np.array([int(update)], dtype=np.int64)
        self.call(self.comm.Allreduce, MPI.IN_PLACE, [value, MPI.INT64_T], op=MPI.MIN)
        return int(value[0])

    def barrier(self) -> None:
        self.call(self.comm.Barrier)

    # -- recovery --------------------------------------------------------------------------------
    def commit(self, completed: bool) -> bool:
        """ULFM's agreement (``MPIX_Comm_agree``) on whether every rank completed the phase just run.

        Collectives are not uniform under failures: a peer dying inside one can let some ranks
        complete it and make others fail. The agreement is: it ANDs the ranks' flags, works on a
        revoked communicator, and when a rank died before contributing it raises
        ``ERR_PROC_FAILED`` at every survivor ("consistently raised at all MPI processes", the
        MPIX_Comm_agree man page). So every survivor returns the same answer here: True (go on)
        or False (put the state from before the phase back, :meth:`recover`, redo it)."""
        if not self.ulfm:
            return completed
        try:
            return bool(self.call(self.comm.Agree, 1 if completed else 0))
        except RankFailure:
            return False

    def recover(self, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Revoke, shrink to the survivors, agree on the last completed update, re-broadcast
        (unless ``model`` is None: root-free gossip keeps every survivor's own parameters).

        Afterwards ``rank``/``size`` describe the shrunk world, ``generation`` is incremented and
        one event per failed rank is appended to ``events``. A further failure during recovery
        is handled by shrinking again.
        """
        if not self.ulfm:
            raise RuntimeError("recover() needs fault_tolerance='ulfm'")
        MPI = self.MPI
        detected = self._detected_at if self._detected_at is not None else time.perf_counter()
        failed_update = self._update
        for _attempt in range(self.size):
            with contextlib.suppress(MPI.Exception):
                self.comm.Revoke()
            new = self.comm.Shrink()
            old_group, new_group = self.comm.Get_group(), new.Get_group()
            gone = MPI.Group.Difference(old_group, new_group)
            failed_old = MPI.Group.Translate_ranks(gone, list(range(gone.Get_size())), old_group)
            survivors_old = MPI.Group.Translate_ranks(new_group, list(range(new_group.Get_size())), old_group)
            failed = [self.world_ranks[r] for r in failed_old]
            self.world_ranks = [self.world_ranks[r] for r in survivors_old]
            for g in (old_group, new_group, gone):
                g.Free()
            new.Set_errhandler(MPI.ERRORS_RETURN)
            self.comm = new
            self.rank, self.size = new.Get_rank(), new.Get_size()
            try:
                # ULFM's fault-tolerant consensus: every survivor reaches this point together.
                self.call(new.Agree, 1)
                last_completed = self.agree(failed_update - 1)
                # Shrink keeps the order of ranks, so new rank 0 is the lowest survivor. Push-sum
                # gossip passes no model: each survivor keeps its own parameters.
                if model is not None:
                    self.broadcast_state(model, optimizer, root=0)
                self.call(new.Barrier)
                break
            except RankFailure:
                continue  # another rank died meanwhile: shrink again
        else:
            raise RuntimeError("recovery failed: ranks kept dying")
        now = time.perf_counter()
        for r in failed:
            if self.cfg.respawn:
                self.lost.append(int(r))
                self._lost_at[int(r)] = detected
            self.events.append(
                {
                    "event": "rank_failure",
                    "rank": int(r),
                    "time": _iso_now(),
                    "update": int(failed_update),
                    "last_completed_update": int(last_completed),
                    "seconds_lost": float(now - min(self._update_start, detected)),
                    "recovery_seconds": float(now - detected),
                    "world_size_after": int(self.size),
                }
            )
        self.generation += 1
        self._detected_at = None
        self._recovered = True
        global _skip_finalize
        _skip_finalize = True

    def respawn(self, update: int) -> list[dict[str, Any]]:
        """Grow the world back: spawn one process per lost rank and merge it in (``--respawn``).

        Collective over the survivors, called between updates. ``MPI_Comm_spawn`` starts the same
        command line (it joins in :class:`MPIWorld`'s constructor through ``Get_parent``), the
        intercommunicator is merged with the survivors first, so the survivors keep their ranks
        and rank 0 keeps writing, and rank 0 sends the newcomers who they replace. The caller then
        hands them the training state (:meth:`broadcast_state` and its own counters). Returns one
        ``rank_rejoin`` event per replaced rank (also appended to :attr:`events`); a spawn that
        fails (no slots, no launcher support) is reported on stderr and the world stays shrunk.
        """
        if not (self.cfg.respawn and self.lost):
            return []
        from marl.distributed.launch import respawn_command

        MPI = self.MPI
        lost, start = sorted(self.lost), time.perf_counter()
        command = respawn_command(sys.argv)
        try:
            inter = self.call(self.comm.Spawn, command[0], args=command[1:], maxprocs=len(lost), root=0)
            merged = self.call(inter.Merge, False)
        except self.MPI.Exception as exc:
            if self.rank == 0:
                print(f"marl: respawn failed, training goes on with {self.size} ranks: {exc.Get_error_string()}",
                      file=sys.stderr, flush=True)  # fmt: skip
            self.lost = []
            return []
        merged.Set_errhandler(MPI.ERRORS_RETURN)
        self.comm = merged
        self.rank, self.size = merged.Get_rank(), merged.Get_size()
        self.world_ranks = self.world_ranks + lost
        self.respawns += 1
        self.generation += 1  # per-communicator state of the gradient syncs is rebuilt
        header = {"world_ranks": self.world_ranks, "original_size": self.original_size, "respawns": self.respawns,
                  "generation": self.generation, "joined": lost}  # fmt: skip
        self._bcast_bytes(json.dumps(header).encode() if self.rank == 0 else None)
        now = time.perf_counter()
        events = [
            {
                "event": "rank_rejoin",
                "rank": r,
                "time": _iso_now(),
                "update": int(update),
                "spawn_seconds": float(now - start),
                "seconds_since_failure": float(now - self._lost_at.pop(r, start)),
                "world_size_after": int(self.size),
                "respawn_round": self.respawns,
            }
            for r in lost
        ]
        self.lost = []
        self.events += events
        return events

    def close(self) -> None:
        exc = sys.exc_info()[1]
        if exc is not None and not (isinstance(exc, SystemExit) and not exc.code):
            # This rank is failing while peers may sit in a collective: a barrier or MPI_Finalize
            # would hang the job. Say why on one line, then take the whole job down.
            from marl.core.errors import ConcordError

            code = exc.exit_code if isinstance(exc, ConcordError) else 1
            print(f"marl: error on rank {self.original_rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            self.MPI.COMM_WORLD.Abort(code)
        # After a recovery, finalising without a barrier on the shrunk communicator can hang
        # (docs/ARCHITECTURE.md, "Dependency facts"); the barrier also keeps rank 0 from exiting while others still write.
        with contextlib.suppress(RankFailure, self.MPI.Exception):
            self.call(self.comm.Barrier)
        if self.newcomer:
            self._wait_for_the_others()

    def _wait_for_the_others(self, timeout: float = 30.0) -> None:
        """A process spawned by ``--respawn`` must call MPI_Finalize (the launcher calls an exit
        without it an abnormal termination: exit code 1), but Finalize waits for every process
        connected to it, and the survivors that spawned it skip Finalize (see _skip_finalize):
        entered while they are alive, it spun forever (measured). Entered after they are gone it
        returns at once. So wait, at most ``timeout`` s, until ULFM reports every rank outside our
        own spawned job dead (a receive nobody sends fails with ERR_PROC_FAILED when its source
        exits). Known limit: after two respawn rounds the replacements of different rounds wait
        for each other until the timeout."""
        MPI = self.MPI
        deadline = time.perf_counter() + timeout
        buf = np.empty(1, np.uint8)
        for r in range(self.size):
            if r == self.rank or self.world_ranks[r] in self.siblings:
                continue
            try:
                request = self.comm.Irecv([buf, MPI.BYTE], source=r, tag=_GONE_TAG)
                while time.perf_counter() < deadline and not request.Test():
                    time.sleep(0.02)
            except MPI.Exception:
                continue  # rank r is gone
            if time.perf_counter() >= deadline:
                return


def _iso_now() -> str:
    """UTC wall-clock time, ISO 8601 (for events a user lines up with logs)."""
    from datetime import datetime

    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _to_skeleton(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """Replace tensors by placeholders (their bytes travel separately); keep JSON-able values."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj.detach().cpu().contiguous())
        return {
            "__tensor__": len(tensors) - 1,
            "shape": list(obj.shape),
            "dtype": str(obj.dtype).removeprefix("torch."),
        }
    if isinstance(obj, dict):
        return {"__dict__": [[_to_skeleton(k, tensors), _to_skeleton(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_skeleton(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_to_skeleton(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot broadcast optimiser state value of type {type(obj).__name__}")


def _from_skeleton(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """Inverse of _to_skeleton; appends freshly allocated tensors (filled by the broadcast)."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            t = torch.empty(obj["shape"], dtype=getattr(torch, obj["dtype"]))
            tensors.append(t)
            return t
        if "__tuple__" in obj:
            return tuple(_from_skeleton(v, tensors) for v in obj["__tuple__"])
        return {_from_skeleton(k, tensors): _from_skeleton(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_from_skeleton(v, tensors) for v in obj]
    return obj


#: Tag of the receive a respawned process waits on until the others have exited (nobody sends it).
_GONE_TAG = 31999

#: Set after a ULFM recovery: MPI_Finalize must then be skipped. Open MPI 5.0's finalize
#: synchronises with every process of MPI_COMM_WORLD, the dead one included, and was seen to
#: wait forever in 2 of 4 runs of `marl train --ranks 4 --fault-tolerance ulfm` with a rank
#: killed; exiting without it after a Barrier on the shrunk communicator is clean (exit 0).
_skip_finalize = False


def _finalize() -> None:
    from mpi4py import MPI

    if not _skip_finalize and MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()


def init_world(cfg: DistConfig) -> World:
    """Join the MPI job this process belongs to, or return a LocalWorld when there is none.

    Under a launcher MPI is initialised here. ``fault_tolerance='ulfm'`` is checked on every
    rank: it needs Open MPI's ULFM and a launcher started with ``--with-ft ulfm`` (which sets
    ``OMPI_MCA_mpi_ft_enable=1``); otherwise ConfigError (never a silent fallback).
    """
    from marl.distributed.launch import ulfm_problem, under_launcher

    if not under_launcher():
        if cfg.ranks > 1:
            raise ConfigError(
                f"bad value for ranks: {cfg.ranks} but this process was not started by an MPI "
                "launcher; call launch_if_needed() first or run under mpiexec"
            )
        return LocalWorld(cfg)
    if cfg.fault_tolerance == "ulfm":
        problem = ulfm_problem()
        if problem is None and os.environ.get("OMPI_MCA_mpi_ft_enable", "").lower() not in ("1", "true", "yes"):  # noqa: SIM112 (Open MPI spells it so)
            problem = "the job was launched without 'mpiexec --with-ft ulfm'"
        if problem is not None:
            raise ConfigError(
                f"bad value for fault_tolerance: 'ulfm' is unsupported here: {problem}; "
                "use --fault-tolerance checkpoint"
            )
    import mpi4py

    if "mpi4py.MPI" not in sys.modules:  # we initialise and finalise MPI ourselves
        mpi4py.rc.initialize = False
        mpi4py.rc.finalize = False
    from mpi4py import MPI

    if not MPI.Is_initialized():
        MPI.Init_thread(MPI.THREAD_MULTIPLE)
        atexit.register(_finalize)
    if MPI.COMM_WORLD.Get_size() == 1 and cfg.fault_tolerance != "ulfm":
        return LocalWorld(cfg)
    return MPIWorld(cfg)
