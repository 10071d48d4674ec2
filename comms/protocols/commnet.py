"""CommNet: agents exchange the mean of their neighbours' hidden states (learned protocol).

Sukhbaatar, Szlam & Fergus (2016), "Learning Multiagent Communication with Backpropagation".
Every agent broadcasts its hidden state; each receiver averages what *arrived* and mixes it into
its own state, for ``rounds`` rounds per environment step:

    c_i^k     = mean_{j != i, delivered[i, j]} q(h_j^k)
    h_i^{k+1} = tanh(H^k h_i^k + C^k c_i^k)

``delivered`` is the channel's ``[.., N, N]`` boolean delivery mask of this step (receiver, sender):
a lost, delayed or crashed sender's message is simply absent from the mean, in training and
evaluation alike, so the policy learns under the channel it will be evaluated on. ``q`` is the
channel's quantiser, applied straight-through so gradients pass the rounding. All rounds of a step
use that step's mask (one delivery decision per link per step).

Bytes: each round every agent broadcasts one ``hidden_size`` vector, so an agent sends
``rounds * hidden_size * bytes_per_value`` bytes per step (a broadcast is counted once per
sender, as the channel counts it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from comms.protocols.learned import LearnedProtocol
from marl.core.protocol import CommsOutput, layer_init, straight_through

__all__ = ["CommNet"]


class CommNet(LearnedProtocol):
    """CommNet mean-communication over a lossy channel; see the module docstring."""

    def __init__(
        self,
        hidden_size: int,
        rounds: int = 2,
        quantise: Callable[[torch.Tensor], torch.Tensor] | None = None,
        bytes_per_value: float = 4.0,
    ) -> None:
        super().__init__(hidden_size, rounds, quantise, bytes_per_value)
        self.self_layers = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(rounds))
        self.comm_layers = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(rounds))
        for layer in [*self.self_layers, *self.comm_layers]:
            layer_init(layer.weight, layer.bias, 1.0)

    def forward(
        self,
        h: torch.Tensor,
        delivered: torch.Tensor | None,
        gate: torch.Tensor | None = None,
        deterministic: bool = False,
    ) -> CommsOutput:
        links = self.received(h, delivered).to(h.dtype)
        count = links.sum(-1, keepdim=True).clamp(min=1.0)
        for self_layer, comm_layer in zip(self.self_layers, self.comm_layers):
            msg = straight_through(self.quantise, h)
            c = (links @ msg) / count
            h = torch.tanh(self_layer(h) + comm_layer(c))
        per_agent = self.rounds * self.hidden_size * self.bytes_per_value
        return CommsOutput(h=h, bytes_sent=torch.full(h.shape[:-1], per_agent, dtype=h.dtype))
