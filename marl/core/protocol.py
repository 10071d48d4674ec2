"""The learned-protocol contract: what a CommNet/TarMAC/IC3Net module returns, and its helpers.

A learned protocol is a ``torch.nn.Module`` called once per batch of steps as

    out = protocol(h, delivered, gate=None, deterministic=False)   # -> CommsOutput

with ``h`` the agents' hidden states ``[B, N, H]`` and ``delivered`` the channel's delivery mask
``[B, receiver, sender]`` for those steps (None: a perfect channel). It is built as
``cls(hidden_size=H, rounds=R, quantise=q, bytes_per_value=bits / 8)``. The policy network
(:mod:`marl.policies`) calls it between its encoder and its action head; the implementations live
in :mod:`comms.protocols` (base class :class:`comms.protocols.learned.LearnedProtocol`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["CommsOutput", "straight_through", "layer_init", "make_quantiser"]


@dataclass
class CommsOutput:
    """What a learned protocol returns for one batch of steps.

    ``h``: the receivers' new hidden states ``[B, N, H]``; ``bytes_sent``: bytes each agent put on
    the channel this step ``[B, N]``; for protocols with a discrete speak/stay-silent choice
    (IC3Net), ``gate`` holds the sampled choices ``[B, N]`` with their ``logprob`` and ``entropy``,
    which the algorithm adds to the action's (the gate is part of the agent's action).
    """

    h: torch.Tensor
    bytes_sent: torch.Tensor
    gate: torch.Tensor | None = None
    logprob: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def straight_through(quantise: Callable[[torch.Tensor], torch.Tensor] | None, x: torch.Tensor) -> torch.Tensor:
    """Apply the channel's quantiser in the forward pass, identity in the backward pass.

    Rounding has zero gradient almost everywhere; the straight-through estimator (Bengio et al.
    2013) lets the protocol learn through the quantiser while evaluation sees the same values.
    """
    if quantise is None:
        return x
    return x + (quantise(x.detach()) - x).detach()


def layer_init(weight: torch.Tensor, bias: torch.Tensor | None, std: float) -> None:
    """Orthogonal weights with gain ``std`` and zero bias (Huang et al. 2022, detail 2)."""
    nn.init.orthogonal_(weight, std)
    if bias is not None:
        nn.init.zeros_(bias)


def make_quantiser(bits: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Torch twin of :func:`comms.channel.quantise`: uniform min-max per message (last axis).

    None for 32 bits (no rounding). The channel and the learned module must round identically, so
    a policy trained through this function is evaluated on exactly the values the channel sends.
    """
    if bits >= 32:
        return None
    levels = float(2**bits - 1)

    def quantise(x: torch.Tensor) -> torch.Tensor:
        lo = x.amin(dim=-1, keepdim=True)
        hi = x.amax(dim=-1, keepdim=True)
        span = hi - lo
        step = torch.where(span > 0, span / levels, torch.ones_like(span))
        return lo + torch.round((x - lo) / step) * step

    return quantise
