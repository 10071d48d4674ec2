"""What the learned protocols (CommNet, TarMAC, IC3Net) share: their settings and who hears whom.

Each learned protocol is a torch module ``forward(h, delivered, gate=None, deterministic=False)``
over hidden states ``h`` of shape ``[*batch, N, H]``. ``delivered`` is the channel's delivery mask
``[*batch, receiver, sender]`` for this step (None: a perfect channel), so message loss and
crashed agents shape training exactly as they shape evaluation. Messages pass through the
channel's quantiser (``quantise``; straight-through in the backward pass) and every module
reports the bytes each agent sent, at ``bytes_per_value`` bytes per value.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["LearnedProtocol"]


class LearnedProtocol(nn.Module):
    """Base of the learned protocols: ``rounds`` of communication per step, quantiser, byte model."""

    def __init__(
        self,
        hidden_size: int,
        rounds: int,
        quantise: Callable[[torch.Tensor], torch.Tensor] | None = None,
        bytes_per_value: float = 4.0,
    ) -> None:
        super().__init__()
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.hidden_size, self.rounds = hidden_size, rounds
        self.quantise, self.bytes_per_value = quantise, bytes_per_value

    @staticmethod
    def received(h: torch.Tensor, delivered: torch.Tensor | None) -> torch.Tensor:
        """Bool ``[*batch, receiver, sender]``: the messages of *others* that arrive this step.

        An agent's own message is never "received" (it has its own state already).
        """
        n = h.shape[-2]
        others = ~torch.eye(n, dtype=torch.bool, device=h.device)
        if delivered is None:  # a perfect channel
            return others.expand(*h.shape[:-2], n, n)
        return delivered & others
