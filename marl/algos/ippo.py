"""IPPO: independent PPO for a team of agents, with optional learned communication.

Every agent runs PPO on its own local observation and reward (de Witt et al. 2020, "Is
Independent Learning All You Need in the StarCraft Multi-Agent Challenge?"). By default all
agents share one network and receive a one-hot agent id (parameter sharing, Yu et al. 2022
"The Surprising Effectiveness of PPO in Cooperative Multi-Agent Games", Sec. 4); with
``shared_parameters=false`` each agent has its own weights (still evaluated in one batched
forward pass, see :class:`marl.policies.GroupLinear`).

This file holds the algorithm's typed config and its registry entry; the batch, GAE, normalisers
and the PPO update it shares with MAPPO are :mod:`marl.algos.ppo`. The loop that collects
rollouts, syncs gradients across MPI ranks, logs and checkpoints is :mod:`marl.training.loop`. The implementation details follow Huang et al. (2022), "The 37 Implementation
Details of Proximal Policy Optimization" (ICLR blog track) — numbered "detail N" below:

* orthogonal init, policy head gain 0.01, value head gain 1 (detail 2, in marl.policies);
* Adam with eps 1e-5 (detail 3) and linear learning-rate annealing (detail 4);
* GAE (detail 5), with bootstrapping at time-limit truncation (Pardo et al. 2018);
* mini-batch updates over shuffled time steps (detail 6) — a mini-batch holds whole time steps,
  all agents together, because communication couples the agents of a step;
* advantage normalisation per mini-batch (detail 7), clipped surrogate (detail 8), clipped value
  loss (detail 9), entropy bonus (detail 10), global gradient clipping at 0.5 (detail 11);
* approximate KL and clip fraction for monitoring, optional early stop on ``target_kl`` (detail 12);
* reward scaling by the running std of the discounted return (gym's NormalizeReward, the
  continuous-control detail 5 of Huang et al.), and optional value normalisation (Yu et al. 2022).

Discrete actions use masked logits (invalid actions get logit -1e8; Huang & Ontañón 2022, "A
Closer Look at Invalid Action Masking"); continuous actions use a Gaussian with a
state-independent log-std, clipped to the box only when sent to the environment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from marl.algos.ppo import ppo_update
from marl.core.errors import ConfigError

__all__ = ["IPPO", "MAX_HIDDEN_SIZE", "IPPOConfig"]

#: Widest network a config may ask for: a checkpoint whose metadata claims more is refused before
#: anything is allocated (a 200,000-wide layer would need ~160 GB).
MAX_HIDDEN_SIZE = 4096
#: Most communication rounds per step (each round is one message exchange).
MAX_COMM_ROUNDS = 16


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class IPPOConfig:
    """Hyper-parameters of IPPO (``marl train --algo-set key=value``). Defaults: CleanRL ppo.py
    where they apply, tuned down in size for CPU training of traffic-signal agents."""

    learning_rate: float = field(default=3e-4, metadata=_help("Adam step size at the start"))
    anneal_lr: bool = field(default=True, metadata=_help("decay the learning rate linearly to 0 over the run"))
    num_steps: int = field(default=128, metadata=_help("env steps per rollout (per rank) before each update"))
    gamma: float = field(default=0.99, metadata=_help("discount factor per env step"))
    gae_lambda: float = field(default=0.95, metadata=_help("GAE lambda"))
    update_epochs: int = field(default=4, metadata=_help("passes over each rollout"))
    num_minibatches: int = field(default=4, metadata=_help("mini-batches per epoch (split over time steps)"))
    norm_adv: bool = field(default=True, metadata=_help("normalise advantages per mini-batch"))
    clip_coef: float = field(default=0.2, metadata=_help("PPO ratio clip"))
    clip_vloss: bool = field(default=True, metadata=_help("clip the value loss like the ratio"))
    ent_coef: float = field(default=0.01, metadata=_help("entropy bonus weight"))
    vf_coef: float = field(default=0.5, metadata=_help("value loss weight"))
    max_grad_norm: float = field(default=0.5, metadata=_help("global gradient norm clip"))
    target_kl: float | None = field(
        default=None, metadata=_help("stop an update's epochs early above this KL (None: never)")
    )
    norm_reward: bool = field(default=True, metadata=_help("scale rewards by the running std of the discounted return"))
    norm_value: bool = field(default=False, metadata=_help("train the critic on normalised returns (Yu et al. 2022)"))
    hidden_size: int = field(default=64, metadata=_help("width of encoder, critic and message vectors"))
    shared_parameters: bool = field(default=True, metadata=_help("one network for all agents (false: one per agent)"))
    agent_id: bool = field(default=True, metadata=_help("append a one-hot agent id to actor and critic inputs"))
    init_logstd: float = field(
        default=0.0, metadata=_help("initial log std of continuous actions (e.g. -1.5: start near the mean action)")
    )
    comm_rounds: int = field(default=1, metadata=_help("communication rounds per step of a learned protocol"))
    comm_mode: Literal["neighbours", "broadcast"] = field(
        default="neighbours", metadata=_help("who a learned protocol's messages go to: topology neighbours or all")
    )
    deterministic_eval: bool = field(default=True, metadata=_help("evaluate with the most likely action"))
    eval_every: int = field(default=10, metadata=_help("updates between evaluation episodes (0: only at the end)"))
    checkpoint_every: int = field(default=10, metadata=_help("updates between checkpoints"))
    keep_checkpoints: int = field(default=3, metadata=_help("checkpoints kept on disk (newest)"))
    torch_threads: int = field(default=1, metadata=_help("torch intra-op threads (small nets: 1 is fastest)"))

    def __post_init__(self) -> None:
        positive = [
            "learning_rate",
            "num_steps",
            "update_epochs",
            "num_minibatches",
            "hidden_size",
            "comm_rounds",
            "checkpoint_every",
            "keep_checkpoints",
            "torch_threads",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"bad {name}={getattr(self, name)}; allowed: a value > 0")
        for name, most in (("hidden_size", MAX_HIDDEN_SIZE), ("comm_rounds", MAX_COMM_ROUNDS)):
            if getattr(self, name) > most:
                raise ConfigError(f"bad {name}={getattr(self, name)}; allowed: 1..{most}")
        if self.num_steps < self.num_minibatches:
            raise ConfigError(f"bad num_steps={self.num_steps}; allowed: >= num_minibatches ({self.num_minibatches})")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"bad {name}={getattr(self, name)}; allowed: a value in [0, 1]")
        if self.eval_every < 0:
            raise ConfigError(f"bad eval_every={self.eval_every}; allowed: an integer >= 0")


class IPPO:
    """Registry entry for ``--algo ippo``: the config class and the critic's input."""

    name: ClassVar[str] = "ippo"
    Config: ClassVar[type] = IPPOConfig
    #: False: the critic sees the agent's own observation; True: the global ``env.state()``.
    centralised_critic: ClassVar[bool] = False
    update: ClassVar[Callable[..., dict[str, float]]] = staticmethod(ppo_update)
