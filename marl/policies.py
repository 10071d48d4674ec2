"""Torch networks for multi-agent policies: encoders, heads, and where communication plugs in.

Every forward pass handles all agents of a step (and a batch of steps) at once: tensors are shaped
``[B, N, ...]`` — ``B`` steps, ``N`` agents — so one call covers the whole team (no Python loop
over agents). The actor is

    obs [B,N,D] ──(+ agent one-hot)──▶ encoder ──h──▶ comms(h, delivered) ──h'──▶ action head

and the critic is a separate MLP on either the local observation (IPPO) or the global state
(MAPPO's centralised critic), also with the agent one-hot. Actor and critic do not share layers
(CleanRL's default; Andrychowicz et al. 2021 found shared trunks hurt on-policy control).

``delivered[b, i, j]`` is True when receiver ``i`` got sender ``j``'s message at that step, as the
channel decided (loss, delay-induced misses, crashed agents). Learned protocols
(:mod:`comms.protocols.commnet`, ``tarmac``, ``ic3net``) take ``(h, delivered)`` and return a
:class:`CommsOutput`; dropped messages never reach the receiver's computation.

Parameters are shared across agents by default (one network, agent identity given as a one-hot
input, as in Yu et al. 2022 MAPPO, Sec. 4); with ``shared=False`` every agent has its own weights,
held in :class:`GroupLinear` tensors so the team is still evaluated in one batched ``einsum``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributions import Categorical, Normal

from marl.core.protocol import CommsOutput, layer_init

__all__ = [
    "GroupLinear",
    "MLP",
    "ActionSpec",
    "ActorCritic",
    "log_prob_entropy",
]


class GroupLinear(nn.Module):
    """``groups`` independent linear layers applied to the agent axis in one batched call.

    ``groups == 1`` is an ordinary shared linear layer; ``groups == N`` gives each agent its own
    weights (input ``[..., N, in]`` -> ``[..., N, out]``). With ``id_agents = N`` the layer also
    sees each agent's one-hot id: since ``W [x; e_i] = W_x x + W[:, in + i]``, the id enters as a
    learned per-agent bias (``id_bias[i]`` = that column), which is the same function without
    building and concatenating one-hot tensors every step.
    """

    def __init__(
        self, groups: int, in_features: int, out_features: int, std: float = math.sqrt(2), id_agents: int = 0
    ) -> None:
        super().__init__()
        self.groups = groups
        full = torch.empty(groups, out_features, in_features + id_agents)
        for g in range(groups):
            layer_init(full[g], None, std)
        # A shared layer keeps a plain [out, in] weight: one fused addmm per call, no indexing.
        weight = full[:, :, :in_features]
        self.weight = nn.Parameter((weight[0] if groups == 1 else weight).contiguous())
        self.bias = nn.Parameter(torch.zeros(out_features) if groups == 1 else torch.zeros(groups, out_features))
        self.id_bias: nn.Parameter | None = None
        if id_agents:
            agent = torch.arange(id_agents)
            group = agent if groups > 1 else torch.zeros_like(agent)
            self.id_bias = nn.Parameter(full[group, :, in_features + agent].contiguous())  # [N, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            y = nn.functional.linear(x, self.weight, self.bias)
        else:
            y = torch.einsum("...ni,noi->...no", x, self.weight) + self.bias
        return y if self.id_bias is None else y + self.id_bias


class MLP(nn.Module):
    """Tanh MLP over the agent axis (tanh, not ReLU: Huang et al. 2022 / Andrychowicz et al. 2021)."""

    def __init__(self, groups: int, sizes: list[int], out_std: float | None = None, id_agents: int = 0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for k in range(len(sizes) - 1):
            last = k == len(sizes) - 2
            std = out_std if (last and out_std is not None) else math.sqrt(2)
            layers.append(GroupLinear(groups, sizes[k], sizes[k + 1], std, id_agents=id_agents if k == 0 else 0))
            if not (last and out_std is not None):
                layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass(frozen=True)
class ActionSpec:
    """The team's (padded) action space: ``kind`` "discrete" with ``size`` choices, or
    "continuous" with ``size`` dimensions bounded by ``low``/``high``."""

    kind: str
    size: int
    low: tuple[float, ...] = ()
    high: tuple[float, ...] = ()


class ActorCritic(nn.Module):
    """Actor (encoder -> comms -> head) and critic for a team of ``n_agents``.

    ``obs_dim``: padded local observation size (plus any rule-based message vector);
    ``critic_dim``: size of the critic's input (local obs for IPPO, global state for MAPPO);
    ``comms``: a learned protocol module or None; ``init_logstd``: initial log std of continuous
    actions (a small value starts the policy near its mean action, e.g. near volt-var on the grid).
    """

    low: torch.Tensor  #: continuous actions: the box's lower bound (a registered buffer)
    high: torch.Tensor  #: continuous actions: the box's upper bound (a registered buffer)

    def __init__(
        self,
        *,
        n_agents: int,
        obs_dim: int,
        critic_dim: int,
        action: ActionSpec,
        hidden: int = 64,
        shared: bool = True,
        agent_id: bool = True,
        comms: nn.Module | None = None,
        init_logstd: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_agents = n_agents
        self.action = action
        self.agent_id = agent_id
        groups = 1 if shared else n_agents
        ids = n_agents if agent_id else 0
        self.encoder = MLP(groups, [obs_dim, hidden, hidden], id_agents=ids)
        self.comms = comms
        # Small final-layer gain for the policy (0.01) and 1.0 for the value: Huang et al. 2022,
        # detail 2 ("orthogonal initialization of weights and constant initialization of biases").
        self.actor_head = MLP(groups, [hidden, action.size], out_std=0.01)
        if action.kind == "continuous":
            # State-independent log std (detail "continuous actions", Huang et al. 2022).
            self.actor_logstd = nn.Parameter(torch.full((groups, action.size), float(init_logstd)))
            self.register_buffer("low", torch.tensor(action.low, dtype=torch.float32))
            self.register_buffer("high", torch.tensor(action.high, dtype=torch.float32))
        self.critic = MLP(groups, [critic_dim, hidden, hidden, 1], out_std=1.0, id_agents=ids)

    def value(self, critic_in: torch.Tensor) -> torch.Tensor:
        """State values ``[B, N]``."""
        return self.critic(critic_in).squeeze(-1)

    def actor(
        self,
        obs: torch.Tensor,
        delivered: torch.Tensor | None,
        action_mask: torch.Tensor | None = None,
        gate: torch.Tensor | None = None,
        deterministic_gate: bool = False,
    ) -> tuple[Any, CommsOutput | None]:
        """The action distribution ``[B, N]`` and the comms output (None without comms)."""
        h = self.encoder(obs)
        comms_out = None
        if self.comms is not None:
            comms_out = self.comms(h, delivered, gate=gate, deterministic=deterministic_gate)
            h = comms_out.h
        out = self.actor_head(h)
        if self.action.kind == "discrete":
            if action_mask is not None:
                # Invalid actions get a very negative logit, so their probability is ~0 and they
                # receive no gradient (Huang & Ontañón 2022, "invalid action masking").
                out = out.masked_fill(~action_mask, -1e8)
            # validate_args=False: argument checks cost ~20% of a small policy's forward pass, and the
            # inputs are ours, not a user's.
            return Categorical(logits=out, validate_args=False), comms_out
        std = self.actor_logstd.expand_as(out).exp()  # [G, A] broadcasts over [B, N, A]
        return Normal(out, std, validate_args=False), comms_out

    def clip_action(self, action: torch.Tensor) -> torch.Tensor:
        """Continuous actions are sampled unbounded and clipped to the box when sent to the env."""
        if self.action.kind != "continuous":
            return action
        return torch.maximum(torch.minimum(action, self.high), self.low)


def log_prob_entropy(dist: Any, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-agent log-probability and entropy ``[B, N]`` (continuous dims are independent: sum)."""
    logprob, entropy = dist.log_prob(action), dist.entropy()
    if isinstance(dist, Normal):
        logprob, entropy = logprob.sum(-1), entropy.sum(-1)
    return logprob, entropy
