"""IC3Net-style gated communication: each agent learns *when* to speak (learned protocol).

Singh, Jain & Sukhbaatar (2019), "Learning when to Communicate at Scale in Multiagent Cooperative
and Competitive Tasks" (IC3Net), ICLR. Every step each agent chooses a binary gate
``g_j ~ Categorical(softmax(G h_j))`` (1 = speak). Receivers average the messages of the agents
that spoke *and* whose message arrived over the channel:

    c_i       = mean_{j != i, delivered[i, j], g_j = 1} q(M h_j)
    h_i'      = tanh(S h_i + C c_i)

The gate is a discrete action: its log-probability and entropy are returned so the algorithm adds
them to the environment action's (IC3Net trains the gate with the same policy gradient). In the
PPO update the gate sampled during the rollout is passed back in (``gate=``), so the ratio is
computed for the choice actually made. Bytes are counted only when an agent speaks:
``g_j * rounds * hidden_size * bytes_per_value``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributions import Categorical

from comms.protocols.learned import LearnedProtocol
from marl.core.protocol import CommsOutput, layer_init, straight_through

__all__ = ["IC3NetGate"]


class IC3NetGate(LearnedProtocol):
    """Gated mean communication; see the module docstring."""

    def __init__(
        self,
        hidden_size: int,
        rounds: int = 1,
        quantise: Callable[[torch.Tensor], torch.Tensor] | None = None,
        bytes_per_value: float = 4.0,
    ) -> None:
        super().__init__(hidden_size, rounds, quantise, bytes_per_value)
        self.gate_head = nn.Linear(hidden_size, 2)
        # Small gain: both choices start near 50/50 (like the policy head, Huang et al. 2022).
        layer_init(self.gate_head.weight, self.gate_head.bias, 0.01)
        self.messages = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(rounds))
        self.self_layers = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(rounds))
        self.comm_layers = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(rounds))
        for layer in [*self.messages, *self.self_layers, *self.comm_layers]:
            layer_init(layer.weight, layer.bias, 1.0)

    def forward(
        self,
        h: torch.Tensor,
        delivered: torch.Tensor | None,
        gate: torch.Tensor | None = None,
        deterministic: bool = False,
    ) -> CommsOutput:
        dist = Categorical(logits=self.gate_head(h), validate_args=False)  # decided from the pre-communication state
        if gate is None:
            gate = dist.probs.argmax(-1) if deterministic else dist.sample()
        speaks = gate.to(torch.bool)  # [B, N]
        links = (self.received(h, delivered) & speaks.unsqueeze(-2)).to(h.dtype)  # [B, receiver, sender]
        count = links.sum(-1, keepdim=True).clamp(min=1.0)
        for message, self_layer, comm_layer in zip(self.messages, self.self_layers, self.comm_layers):
            msg = straight_through(self.quantise, message(h))
            c = (links @ msg) / count
            h = torch.tanh(self_layer(h) + comm_layer(c))
        per_speaker = self.rounds * self.hidden_size * self.bytes_per_value
        return CommsOutput(
            h=h,
            bytes_sent=speaks.to(h.dtype) * per_speaker,
            gate=gate,
            logprob=dist.log_prob(gate),
            entropy=dist.entropy(),
        )
