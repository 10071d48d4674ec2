"""Typed configuration of distributed training (``marl train --ranks/--sync/--compress ...``).

:class:`DistConfig` is the single source of the options' types, defaults and help. It validates
itself on construction, so a bad ``--sync`` or ``--compress`` fails at once with a one-line
:class:`~marl.core.errors.ConcordError`, before any simulator or MPI launcher starts. Checks that need
the MPI library (is ULFM available?) live in :mod:`marl.distributed.launch`.
"""

from __future__ import annotations

import math
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from marl.core.errors import ConfigError, show, unknown

__all__ = [
    "DistConfig",
    "SYNC_METHODS",
    "COMPRESSORS",
    "FAULT_TOLERANCE",
    "parse_compress",
    "parse_inject_failure",
    "parse_hosts",
    "read_hostfile",
    "is_local_host",
]

#: Gradient synchronisation methods (see marl/distributed/sync.py).
SYNC_METHODS = ("allreduce", "ring", "ps", "gossip")
#: Compressor families; topk and powersgd take a parameter (``topk:0.01``, ``powersgd:2``).
COMPRESSORS = ("none", "fp16", "topk", "powersgd")
FAULT_TOLERANCE = ("none", "ulfm", "checkpoint")
#: Largest fused gradient bucket, MB: far above any model Concord trains (buckets are allocated).
MAX_BUCKET_MB = 4096.0


def parse_compress(spec: str) -> tuple[str, float]:
    """``"topk:0.01"`` -> ``("topk", 0.01)``; ``"powersgd:2"`` -> ``("powersgd", 2.0)``.

    Raises ConfigError for an unknown family or a missing/out-of-range parameter.
    """
    name, sep, arg = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in COMPRESSORS:
        raise unknown("compressor", spec, ["none", "fp16", "topk:RATIO", "powersgd:RANK"])
    if name in ("none", "fp16"):
        if sep:
            raise ConfigError(f"bad compressor {show(spec)}: '{name}' takes no parameter")
        return name, 0.0
    if not sep or not arg.strip():
        example = "topk:0.01" if name == "topk" else "powersgd:2"
        raise ConfigError(f"bad compressor {show(spec)}: '{name}' needs a parameter, e.g. {example}")
    try:
        value = float(arg)
    except ValueError:
        raise ConfigError(f"bad compressor {show(spec)}: parameter {show(arg)} is not a number") from None
    if name == "topk" and not 0.0 < value <= 1.0:
        raise ConfigError(f"bad compressor {show(spec)}: top-k ratio must lie in (0, 1], e.g. topk:0.01")
    if name == "powersgd" and (value < 1 or not value.is_integer()):
        raise ConfigError(f"bad compressor {show(spec)}: PowerSGD rank must be an integer >= 1, e.g. powersgd:2")
    return name, value


#: Largest hostfile read, bytes: a hostfile of 10,000 nodes is ~300 KB.
MAX_HOSTFILE_BYTES = 1_000_000
#: Largest slot count of one host (a safety bound on a typo such as slots=20000000).
MAX_SLOTS = 4096
_HOST_NAME = re.compile(r"^[A-Za-z0-9_.:\[\]-]+$")


def _host_entry(name: str, slots: str, where: str) -> tuple[str, int]:
    """One validated (host, slots) pair; ``where`` names its origin in the error message."""
    if not _HOST_NAME.match(name):
        raise ConfigError(f"bad host {show(name)} in {where}; expected a host name or address")
    if not slots.isdigit() or not 1 <= int(slots) <= MAX_SLOTS:
        raise ConfigError(f"bad slot count {show(slots)} for host {show(name)} in {where}; allowed: 1..{MAX_SLOTS}")
    return name, int(slots)


def parse_hosts(spec: str) -> list[tuple[str, int]]:
    """``"node1:4,node2:4"`` (mpiexec's ``--host`` syntax; ``node`` alone is one slot; IPv6 in
    brackets, ``[::1]:2``) -> ``[("node1", 4), ("node2", 4)]``."""
    hosts = []
    for item in spec.split(","):
        item = item.strip()
        name, sep, slots = item.rpartition(":")
        if not sep or not slots.isdigit():  # "node" alone, or a bracketed IPv6 address "[::1]"
            name, slots = item, "1"
        hosts.append(_host_entry(name, slots, "--host"))
    return hosts


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """The (host, slots) pairs of an Open MPI hostfile: one host per line, ``name [slots=N]``,
    ``#`` starts a comment. Other keywords (``max_slots=``) are left to mpiexec."""
    file = Path(path)
    where = f"hostfile {show(path)}"
    if not file.is_file():
        raise ConfigError(f"bad hostfile {show(path)}: no such file")
    if file.stat().st_size > MAX_HOSTFILE_BYTES:
        raise ConfigError(f"bad hostfile {show(path)}: larger than {MAX_HOSTFILE_BYTES} bytes")
    hosts = []
    for line in file.read_text(errors="replace").splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        slots = next((w.split("=", 1)[1] for w in words[1:] if w.startswith("slots=")), "1")
        hosts.append(_host_entry(words[0], slots, where))
    if not hosts:
        raise ConfigError(f"bad hostfile {show(path)}: it lists no host")
    return hosts


def is_local_host(name: str) -> bool:
    """True when ``name`` is this machine (loopback names, its host name or fully qualified name)."""
    return name.strip("[]") in ("localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn())


_INJECT = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*(?::\s*(update|checkpoint|log)\s*)?$")


def parse_inject_failure(spec: str) -> list[tuple[int, int, str]]:
    """The kills an ``inject_failure`` spec asks for, as (rank, update, point) triples in the
    order given: ``"1:3"`` -> ``[(1, 3, "update")]`` (rank 1 dies as update 3 starts);
    ``"1:2,2:4"`` -> two kills (rank 1 at update 2, then rank 2 at update 4); ``""`` -> [].

    ``rank`` is the ORIGINAL MPI rank (the rank at launch): after a ULFM shrink the survivors are
    renumbered, but ``"2:4"`` still means the process that started as rank 2. The optional third
    field of a point says where it dies: ``update`` (default, as the update starts), ``checkpoint``
    (inside the checkpoint writer, its temporary file half written) or ``log`` (the update done and
    averaged, its rows not yet written: the process first stalls a few seconds, as a writer slowed
    by a loaded disk, so that its peers run ahead of it). A rank dies once, so it may appear in one
    point only (a ``--respawn`` replacement is never killed)."""
    points: list[tuple[int, int, str]] = []
    for part in spec.split(",") if spec else []:
        match = _INJECT.match(part)
        if not match:
            raise ConfigError(
                f"bad inject_failure point {show(part)} in {show(spec)}; expected RANK:UPDATE[:checkpoint|:log] "
                "points separated by commas, e.g. 1:3 or 1:2,2:4"
            )
        rank, update, point = int(match.group(1)), int(match.group(2)), match.group(3) or "update"
        if any(rank == r for r, _, _ in points):
            raise ConfigError(
                f"bad inject_failure {show(spec)}: rank {rank} is named twice; a rank dies once, name each rank once"
            )
        points.append((rank, update, point))
    return points


@dataclass
class DistConfig:
    """How training is spread over MPI ranks. World size 1 needs no MPI at all."""

    ranks: int = field(
        default=1,
        metadata={"help": "Number of MPI ranks; > 1 relaunches the command under the venv's mpiexec."},
    )
    sync: str = field(
        default="allreduce",
        metadata={
            "help": "Gradient sync: allreduce (fused buckets), ring (own ring allreduce), "
            "ps (parameter server on rank 0), gossip (decentralised SGD with neighbours)."
        },
    )
    compress: str = field(
        default="none",
        metadata={
            "help": "Gradient compression: none, fp16, topk:RATIO or powersgd:RANK "
            "(both with error feedback); needs sync=allreduce."
        },
    )
    bucket_mb: float = field(
        default=25.0, metadata={"help": "Size of a fused gradient bucket in MB (1e6 bytes of fp32)."}
    )
    overlap: bool = field(
        default=False,
        metadata={"help": "Overlap per-bucket non-blocking allreduce with the backward pass."},
    )
    fault_tolerance: str = field(
        default="none",
        metadata={
            "help": "none, ulfm (survivors shrink and continue; needs Open MPI with "
            "--with-ft ulfm) or checkpoint (atomic checkpoints + --resume)."
        },
    )
    respawn: bool = field(
        default=False,
        metadata={
            "help": "After a failure (ULFM), spawn one new rank per lost rank, hand it the live state "
            "and train on at the full size; needs fault_tolerance=ulfm and sync=allreduce."
        },
    )
    respawned: bool = field(
        default=False,
        metadata={"help": "Hidden: set on the command line of a process spawned by --respawn to replace a rank."},
    )
    sync_every: int = field(
        default=1,
        metadata={
            "help": "K local updates, then one averaging round of parameters (LocalSGD/DiLoCo); "
            "allreduce with K=1 averages gradients every optimiser step instead. allreduce or gossip."
        },
    )
    inject_failure: str = field(
        default="",
        metadata={
            "help": "Hidden, for tests and demos: 'R:U' kills rank R at update U; 'R:U:checkpoint' kills it "
            "inside the checkpoint writer of update U (the temporary file half written); 'R:U:log' stalls "
            "rank R before it logs update U (its peers run ahead), then kills it. Several points separated "
            "by commas ('1:2,2:4') kill several ranks, each at its own update; R is always the rank at "
            "launch (the original MPI rank), also after a ULFM shrink renumbers the survivors."
        },
    )
    oversubscribe: bool = field(
        default=False,
        metadata={
            "help": "Allow more than 4 ranks per core (up to what memory holds); passes --oversubscribe to mpiexec."
        },
    )

    hostfile: str = field(
        default="",
        metadata={"help": "Open MPI hostfile ('name slots=N' per line): spread the ranks over these hosts."},
    )
    host: str = field(
        default="", metadata={"help": "Hosts as mpiexec --host takes them, e.g. node1:4,node2:4 (or a hostfile)."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.ranks, bool) or not isinstance(self.ranks, int) or self.ranks < 1:
            raise ConfigError(f"bad value for ranks: {show(self.ranks)}; expected an integer >= 1")
        if self.sync not in SYNC_METHODS:
            raise unknown("sync method", str(self.sync), SYNC_METHODS)
        name, _ = parse_compress(self.compress)
        if name != "none" and self.sync != "allreduce":
            raise ConfigError(
                f"bad combination sync={show(self.sync)} with compress={show(self.compress)}; "
                "compression works with sync=allreduce only"
            )
        if not (math.isfinite(self.bucket_mb) and 0 < self.bucket_mb <= MAX_BUCKET_MB):
            raise ConfigError(
                f"bad value for bucket_mb: {show(self.bucket_mb)}; allowed: a number in (0, {MAX_BUCKET_MB}]"
            )
        if self.fault_tolerance not in FAULT_TOLERANCE:
            raise unknown("fault tolerance mode", str(self.fault_tolerance), FAULT_TOLERANCE)
        if self.overlap and (self.sync != "allreduce" or name != "none"):
            raise ConfigError("bad value for overlap: 'true'; overlap works with sync=allreduce and compress=none only")
        parse_inject_failure(self.inject_failure)
        if self.respawn and (self.fault_tolerance != "ulfm" or self.sync != "allreduce"):
            raise ConfigError(
                f"bad combination --respawn with fault_tolerance={show(self.fault_tolerance)}, sync={show(self.sync)}; "
                "respawn needs --fault-tolerance ulfm and --sync allreduce"
            )
        if (
            isinstance(self.sync_every, bool)
            or not isinstance(self.sync_every, int)
            or not 1 <= self.sync_every <= 10_000
        ):
            raise ConfigError(f"bad value for sync_every: {show(self.sync_every)}; allowed: an integer in 1..10000")
        if self.sync_every > 1 and (self.sync not in ("allreduce", "gossip") or name != "none" or self.overlap):
            raise ConfigError(
                f"bad value for sync_every: {self.sync_every}; K > 1 works with sync=allreduce or gossip, "
                "without compression or overlap"
            )
        if self.hostfile and self.host:
            raise ConfigError("bad combination --hostfile with --host; give one of them")
        hosts = self.hosts
        if hosts and not self.oversubscribe and self.ranks > sum(n for _, n in hosts):
            raise ConfigError(
                f"bad value for ranks: {self.ranks}; the hosts given have {sum(n for _, n in hosts)} slots "
                "(add slots, or --oversubscribe)"
            )

    @property
    def hosts(self) -> list[tuple[str, int]]:
        """The (host, slots) pairs of ``--hostfile`` or ``--host``; [] for this machine only."""
        if self.hostfile:
            return read_hostfile(self.hostfile)
        return parse_hosts(self.host) if self.host else []

    def local_ranks(self) -> int:
        """How many of the ranks mpiexec puts on this machine: it fills the hosts' slots in order
        (Open MPI's default by-slot mapping); ranks beyond every slot (``--oversubscribe``) are
        counted as local when a local host is listed, the conservative bound."""
        hosts = self.hosts
        if not hosts:
            return self.ranks
        left, local = self.ranks, 0
        for name, slots in hosts:
            placed = min(slots, left)
            left -= placed
            local += placed if is_local_host(name) else 0
        if left and any(is_local_host(name) for name, _ in hosts):
            local += left
        return local

    @property
    def compressor(self) -> tuple[str, float]:
        """The parsed ``compress`` option: (family, parameter)."""
        return parse_compress(self.compress)

    @property
    def failures(self) -> list[tuple[int, int, str]]:
        """The parsed ``inject_failure`` option: (original rank, update, point) per kill; [] for none."""
        return parse_inject_failure(self.inject_failure)
