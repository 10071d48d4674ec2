"""The team's network, built from a layout, and one batched forward for acting.

:func:`build_model` plugs a learned protocol (if any) between the actor's encoder and its head;
:func:`act` is the single forward pass used by training rollouts, evaluation and
``marl run --policy`` alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.distributions import Categorical

from marl.core import registry
from marl.core.protocol import make_quantiser
from marl.policies import ActionSpec, ActorCritic, log_prob_entropy
from marl.training.communication import Communication
from marl.training.layout import TeamLayout

__all__ = ["act", "build_model", "critic_input_size"]


def critic_input_size(algo_cls: Any, layout: TeamLayout, comm: Communication) -> int:
    """The critic's input: the global state (centralised critic) or the actor's own input."""
    return layout.state_size if algo_cls.centralised_critic else layout.obs_dim + comm.message_size


def build_model(algo_cls: Any, config: Any, layout: TeamLayout, comm: Communication) -> Any:
    """The team's network: the algorithm's own (``algo_cls.build_network``, e.g. IDQN's Q-network,
    which gets plain sizes) or the ActorCritic with the learned protocol plugged between encoder
    and head."""
    if hasattr(algo_cls, "build_network"):
        return algo_cls.build_network(config, layout.n, layout.obs_dim + comm.message_size, layout.action_dim)
    comms_module = None
    if comm.learned:
        cls = registry.load(registry.protocol_spec(comm.protocol).entry_point)
        bits = comm.bits
        comms_module = cls(
            hidden_size=config.hidden_size,
            rounds=config.comm_rounds,
            quantise=make_quantiser(bits),
            bytes_per_value=bits / 8.0,
        )
        # Channel byte model per message = header + scale + payload (comms.channel.message_bytes).
        comm.payload_size = (
            int(getattr(comms_module, "key_size", 0) + getattr(comms_module, "value_size", 0)) or config.hidden_size
        )
    action = ActionSpec(kind=layout.kind, size=layout.action_dim, low=tuple(layout.low), high=tuple(layout.high))
    return ActorCritic(
        n_agents=layout.n,
        obs_dim=layout.obs_dim + comm.message_size,
        critic_dim=critic_input_size(algo_cls, layout, comm),
        action=action,
        hidden=config.hidden_size,
        shared=config.shared_parameters,
        agent_id=config.agent_id,
        comms=comms_module,
        init_logstd=getattr(config, "init_logstd", 0.0),  # continuous actions only (IPPO/MAPPO)
    )


def act(
    model: ActorCritic,
    obs: np.ndarray,
    delivered: np.ndarray | None,
    amask: np.ndarray | None,
    deterministic: bool,
    critic_in: np.ndarray | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Any, Any, Any, Any]:
    """One batched no-grad forward for the whole team: (action [N..], logprob [N], comms output,
    value [N] or None). The value is computed in the same pass when ``critic_in`` is given.

    With a leading env axis (``obs`` [K, N, D], the other inputs alike: ``marl train --envs K``)
    the K teams go through one forward as a batch of K (messages stay within each team) and the
    outputs keep that axis: action [K, N..], logprob [K, N], value [K, N].

    ``generator``: where sampled actions draw from (an evaluation seeds one per episode, so a
    stochastic policy's episodes repeat); None: torch's global generator (training)."""
    envs = obs.ndim == 3

    def batch(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a) if envs else torch.from_numpy(a)[None]

    def maybe(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else batch(a)

    with torch.inference_mode():
        dist, cout = model.actor(batch(obs), maybe(delivered), maybe(amask), deterministic_gate=deterministic)
        if isinstance(dist, Categorical):
            # Straight from the logits: cheaper than Categorical.sample/log_prob per step.
            logp_all = dist.logits  # normalised log-probabilities
            action = (
                logp_all.argmax(-1)
                if deterministic
                else torch.multinomial(logp_all.reshape(-1, logp_all.shape[-1]).exp(), 1, generator=generator).reshape(
                    logp_all.shape[:-1]
                )
            )
            logprob = logp_all.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        else:
            if deterministic:
                action = dist.mean
            elif generator is None:
                action = dist.sample()
            else:
                action = dist.mean + dist.stddev * torch.randn(dist.mean.shape, generator=generator)
            logprob, _ = log_prob_entropy(dist, action)
        if cout is not None and cout.logprob is not None:
            logprob = logprob + cout.logprob
        value = None if critic_in is None else model.value(batch(critic_in))
    if envs:
        return action, logprob, cout, value
    return action[0], logprob[0], cout, None if value is None else value[0]
