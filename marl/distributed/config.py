"""Typed configuration of distributed training (``marl train --ranks/--sync/--compress ...``).

:class:`DistConfig` is the single source of the options' types, defaults and help. It validates
itself on construction, so a bad ``--sync`` or ``--compress`` fails at once with a one-line
:class:`~marl.core.errors.ConcordError`, before any simulator or MPI launcher starts. Checks that need
the MPI library (is ULFM available?) live in :mod:`marl.distributed.launch`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from marl.core.errors import ConfigError, show, unknown

__all__ = [
    "DistConfig",
    "SYNC_METHODS",
    "COMPRESSORS",
    "FAULT_TOLERANCE",
    "parse_compress",
    "parse_inject_failure",
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


_INJECT = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_inject_failure(spec: str) -> tuple[int, int] | None:
    """``"1:3"`` -> ``(1, 3)`` (rank 1 dies at update 3); ``""`` -> None."""
    if not spec:
        return None
    match = _INJECT.match(spec)
    if not match:
        raise ConfigError(f"bad inject_failure {show(spec)}; expected RANK:UPDATE, e.g. 1:3")
    return int(match.group(1)), int(match.group(2))


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
    inject_failure: str = field(
        default="", metadata={"help": "Hidden, for tests and demos: 'R:U' kills rank R at update U."}
    )
    oversubscribe: bool = field(
        default=False,
        metadata={
            "help": "Allow more than 4 ranks per core (up to what memory holds); passes --oversubscribe to mpiexec."
        },
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

    @property
    def compressor(self) -> tuple[str, float]:
        """The parsed ``compress`` option: (family, parameter)."""
        return parse_compress(self.compress)

    @property
    def failure(self) -> tuple[int, int] | None:
        """The parsed ``inject_failure`` option: (rank, update) or None."""
        return parse_inject_failure(self.inject_failure)
