"""TarMAC: targeted multi-agent communication by signature-query attention (learned protocol).

Das et al. (2019), "TarMAC: Targeted Multi-Agent Communication", ICML. Each agent broadcasts a
message made of a *signature* ``k_j`` (what the message is about) and a *value* ``v_j``; every
receiver forms a *query* ``q_i`` from its own state and attends over the messages that arrived:

    a_ij       = softmax_j ( q_i . k_j / sqrt(d_k) )   over j with delivered[i, j] (and j = i)
    c_i        = sum_j a_ij v_j
    h_i^{k+1}  = tanh(W^k [h_i^k ; c_i])

The sender does not pick receivers: targeting is done by the receivers' attention, so the message
is one broadcast. ``rounds`` > 1 repeats this with the updated states (multi-round TarMAC). The
agent's own message is always available to itself (it never crosses the channel), which also
keeps the softmax defined when nothing arrives. Signature and value are quantised by the channel's
quantiser, straight-through. Bytes per agent per step: ``rounds * (key_size + value_size) *
bytes_per_value``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from comms.protocols.learned import LearnedProtocol
from marl.core.protocol import CommsOutput, layer_init, straight_through

__all__ = ["TarMAC"]


class TarMAC(LearnedProtocol):
    """Signature-query attention over delivered messages; see the module docstring."""

    def __init__(
        self,
        hidden_size: int,
        rounds: int = 2,
        quantise: Callable[[torch.Tensor], torch.Tensor] | None = None,
        bytes_per_value: float = 4.0,
        key_size: int = 16,
        value_size: int = 32,
    ) -> None:
        super().__init__(hidden_size, rounds, quantise, bytes_per_value)
        self.key_size, self.value_size = key_size, value_size
        self.keys = nn.ModuleList(nn.Linear(hidden_size, key_size) for _ in range(rounds))
        self.values = nn.ModuleList(nn.Linear(hidden_size, value_size) for _ in range(rounds))
        self.queries = nn.ModuleList(nn.Linear(hidden_size, key_size) for _ in range(rounds))
        self.updates = nn.ModuleList(nn.Linear(hidden_size + value_size, hidden_size) for _ in range(rounds))
        for layer in [*self.keys, *self.values, *self.queries, *self.updates]:
            layer_init(layer.weight, layer.bias, 1.0)

    def forward(
        self,
        h: torch.Tensor,
        delivered: torch.Tensor | None,
        gate: torch.Tensor | None = None,
        deterministic: bool = False,
    ) -> CommsOutput:
        n = h.shape[-2]
        # An agent also attends to its own message, so every softmax row has a finite entry.
        allowed = self.received(h, delivered) | torch.eye(n, dtype=torch.bool, device=h.device)
        scale = 1.0 / math.sqrt(self.key_size)
        for key, value, query, update in zip(self.keys, self.values, self.queries, self.updates):
            k = straight_through(self.quantise, key(h))  # [B, N, dk]: sent
            v = straight_through(self.quantise, value(h))  # [B, N, dv]: sent
            q = query(h)  # [B, N, dk]: stays with the receiver
            scores = (q @ k.transpose(-1, -2)) * scale  # [B, receiver, sender]
            scores = scores.masked_fill(~allowed, float("-inf"))
            attention = torch.softmax(scores, dim=-1)
            c = attention @ v
            h = torch.tanh(update(torch.cat([h, c], dim=-1)))
        per_agent = self.rounds * (self.key_size + self.value_size) * self.bytes_per_value
        return CommsOutput(h=h, bytes_sent=torch.full(h.shape[:-1], per_agent, dtype=h.dtype))
