"""Fused gradient buckets: many parameter tensors packed into one contiguous fp32 buffer.

One collective per bucket instead of one per tensor amortises the per-call latency that
dominates small messages (Horovod's "tensor fusion"; Sergeev & Del Balso 2018; PyTorch DDP
buckets, Li et al. VLDB 2020). Buckets are always fp32: bf16/fp16 gradients are cast on the way
in and back on the way out, because mpi4py sends bf16 as raw bytes and a SUM over raw bytes is
garbage (docs/ARCHITECTURE.md, "Dependency facts").

After a sync, each fp32 parameter's ``.grad`` *is* a view into its bucket, so when the training
loop zeroes gradients in place (``zero_grad(set_to_none=False)``) the next backward accumulates
straight into the bucket and packing costs nothing; with ``set_to_none=True`` packing is one
memcpy per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Bucket", "make_buckets"]


@dataclass
class Bucket:
    """A contiguous fp32 buffer holding the gradients (or parameters) of ``params``."""

    index: int
    params: list[torch.nn.Parameter]
    offsets: list[int]
    buffer: torch.Tensor
    #: Parameters whose grad arrived since the last sync (for overlap with backward).
    ready: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        # Views are made once: creating ~1000 views per update costs more than a small Allreduce.
        self.views = [self.buffer[off : off + p.numel()].view(p.shape) for p, off in zip(self.params, self.offsets)]
        self._fp32_cpu = all(p.dtype == torch.float32 and p.device.type == "cpu" for p in self.params)

    @property
    def numel(self) -> int:
        return self.buffer.numel()

    def slot(self, i: int) -> torch.Tensor:
        """The part of the buffer that belongs to parameter ``i``, shaped like it."""
        return self.views[i]

    def grads_in_place(self) -> bool:
        """True when every ``.grad`` already is its bucket view (nothing to pack or unpack)."""
        return self._fp32_cpu and all(p.grad is v for p, v in zip(self.params, self.views))

    def pack_grads(self) -> None:
        """Copy gradients into the buffer (None counts as zero); skip grads already in place."""
        if self.grads_in_place():
            return
        grads = [p.grad for p in self.params]
        if all(g is not None for g in grads):
            # One kernel for the whole bucket (casts bf16/fp16 to fp32 on the way).
            torch.cat([g.detach().reshape(-1) for g in grads if g is not None], out=self.buffer)
            return
        for v, g in zip(self.views, grads):
            if g is None:
                v.zero_()
            elif g is not v:
                v.copy_(g.detach())

    def unpack_grads(self) -> None:
        """Make every ``p.grad`` hold the (averaged) buffer contents, in p's dtype."""
        for p, v in zip(self.params, self.views):
            if p.grad is v:
                continue
            if p.dtype == torch.float32 and p.device.type == "cpu":
                p.grad = v  # a view: the next backward can accumulate in place
            elif p.grad is None:
                p.grad = v.to(dtype=p.dtype, device=p.device)
            else:
                p.grad.copy_(v)

    def pack_params(self) -> None:
        with torch.no_grad():
            torch.cat([p.detach().reshape(-1) for p in self.params], out=self.buffer)

    def unpack_params(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in self.params], self.views)


def make_buckets(params: list[torch.nn.Parameter], bucket_bytes: int) -> list[Bucket]:
    """Group ``params`` into fp32 buckets of at most ``bucket_bytes`` (a larger tensor gets its
    own bucket). Parameters are taken in reverse order, which is roughly the order in which
    backward produces their gradients (as in PyTorch DDP), so early buckets fill first."""
    capacity = max(1, bucket_bytes // 4)
    groups: list[list[torch.nn.Parameter]] = []
    current: list[torch.nn.Parameter] = []
    filled = 0
    for p in reversed(params):
        if current and filled + p.numel() > capacity:
            groups.append(current)
            current, filled = [], 0
        current.append(p)
        filled += p.numel()
    if current:
        groups.append(current)
    buckets = []
    for index, group in enumerate(groups):
        offsets, total = [], 0
        for p in group:
            offsets.append(total)
            total += p.numel()
        buckets.append(Bucket(index, group, offsets, _comm_buffer(total)))
    return buckets


def _comm_buffer(numel: int) -> torch.Tensor:
    """A zeroed fp32 buffer for MPI, allocated by numpy so that large buffers get transparent
    huge pages: numpy madvises them (MADV_HUGEPAGE) and torch's CPU allocator does not unless
    THP_MEM_ALLOC_ENABLE=1. With the kernel's THP mode "madvise" (the common default), a 16 MB
    in-place Allreduce between 2 ranks over shared memory took ~1.6x longer on a torch-allocated
    (4 KB-page) buffer than on a numpy one, all of it TLB misses (marl bench allreduce).
    The start is aligned to a 64-byte cache line, as torch's allocator does (numpy: 16 bytes)."""
    raw = np.zeros(numel + 16, dtype=np.float32)
    start = (-raw.ctypes.data % 64) // 4
    return torch.from_numpy(raw[start : start + numel])
