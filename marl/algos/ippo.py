"""IPPO: independent PPO for a team of agents, with optional learned communication.

Every agent runs PPO on its own local observation and reward (de Witt et al. 2020, "Is
Independent Learning All You Need in the StarCraft Multi-Agent Challenge?"). By default all
agents share one network and receive a one-hot agent id (parameter sharing, Yu et al. 2022
"The Surprising Effectiveness of PPO in Cooperative Multi-Agent Games", Sec. 4); with
``shared_parameters=false`` each agent has its own weights (still evaluated in one batched
forward pass, see :class:`marl.policies.GroupLinear`).

This file holds the algorithm: the typed config, the GAE advantage computation and the PPO update.
The loop that collects rollouts, syncs gradients across MPI ranks, logs and checkpoints is
:mod:`marl.train`. The implementation details follow Huang et al. (2022), "The 37 Implementation
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
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from marl.core.errors import ConfigError
from marl.policies import ActorCritic, log_prob_entropy

__all__ = ["IPPOConfig", "IPPO", "Batch", "compute_gae", "ppo_update", "RunningMeanStd", "RewardScaler"]


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
    target_kl: float | None = field(default=None, metadata=_help("stop an update's epochs early above this KL (None: never)"))
    norm_reward: bool = field(default=True, metadata=_help("scale rewards by the running std of the discounted return"))
    norm_value: bool = field(default=False, metadata=_help("train the critic on normalised returns (Yu et al. 2022)"))
    hidden_size: int = field(default=64, metadata=_help("width of encoder, critic and message vectors"))
    shared_parameters: bool = field(default=True, metadata=_help("one network for all agents (false: one per agent)"))
    agent_id: bool = field(default=True, metadata=_help("append a one-hot agent id to actor and critic inputs"))
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
        positive = ["learning_rate", "num_steps", "update_epochs", "num_minibatches", "hidden_size",
                    "comm_rounds", "checkpoint_every", "keep_checkpoints", "torch_threads"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"bad {name}={getattr(self, name)}; allowed: a value > 0")
        if self.num_steps < self.num_minibatches:
            raise ConfigError(
                f"bad num_steps={self.num_steps}; allowed: >= num_minibatches ({self.num_minibatches})"
            )
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"bad {name}={getattr(self, name)}; allowed: a value in [0, 1]")
        if self.eval_every < 0:
            raise ConfigError(f"bad eval_every={self.eval_every}; allowed: an integer >= 0")


@dataclass
class Batch:
    """One rollout of ``T`` steps of ``N`` agents, as the update consumes it (all torch tensors).

    ``obs`` [T,N,D] actor inputs; ``critic_in`` [T,N,C]; ``delivered`` [T,N,N] channel masks
    (None without a learned protocol); ``action_mask`` [T,N,A] or None; ``actions`` [T,N] or
    [T,N,A]; ``gates`` [T,N] speak choices of a gated protocol or None; ``logprobs``/``values``/
    ``advantages``/``returns`` [T,N] (values and returns in the critic's own scale).
    """

    obs: torch.Tensor
    critic_in: torch.Tensor
    delivered: torch.Tensor | None
    action_mask: torch.Tensor | None
    actions: torch.Tensor
    gates: torch.Tensor | None
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def compute_gae(
    rewards: np.ndarray,
    values: np.ndarray,
    ended: np.ndarray,
    last_value: np.ndarray,
    gamma: float,
    lam: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation (Schulman et al. 2016) over a rollout.

    ``rewards``/``values`` [T,N]; ``ended[t]`` True when the episode ended at step t (time-limit
    truncations have already had ``gamma * V(s_T)`` added to their reward, so they are cut like
    terminations here); ``last_value`` [N] is V of the state after the rollout. Returns
    (advantages, returns) [T,N].
    """
    steps = rewards.shape[0]
    advantages = np.zeros_like(rewards)
    next_adv = np.zeros_like(last_value)
    next_value = last_value
    for t in reversed(range(steps)):
        nonterminal = 0.0 if ended[t] else 1.0
        delta = rewards[t] + gamma * next_value * nonterminal - values[t]
        next_adv = delta + gamma * lam * nonterminal * next_adv
        advantages[t] = next_adv
        next_value = values[t]
    return advantages, advantages + values


class RunningMeanStd:
    """Running mean and variance (Chan et al. parallel update), for reward and value scaling."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).ravel()
        if x.size == 0:
            return
        b_mean, b_var, b_count = float(x.mean()), float(x.var()), x.size
        delta, total = b_mean - self.mean, self.count + b_count
        self.mean += delta * b_count / total
        m2 = self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> float:
        return float(np.sqrt(self.var + 1e-8))

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])


class RewardScaler:
    """Divide rewards by the running std of the discounted return, clip to +-10 (like gym's
    NormalizeReward, which CleanRL's continuous PPO uses). Keeps the critic's targets O(1) for
    scenarios whose rewards are large (traffic waiting times in seconds)."""

    def __init__(self, n_agents: int, gamma: float) -> None:
        self.gamma = gamma
        self.returns = np.zeros(n_agents)
        self.stats = RunningMeanStd()

    def scale_rollout(self, rewards: np.ndarray, ended: np.ndarray) -> np.ndarray:
        """Scale a rollout's rewards [T, N] (``ended[t]``: episode ended at step t)."""
        returns = np.empty_like(rewards, dtype=np.float64)
        for t in range(rewards.shape[0]):
            self.returns = self.returns * self.gamma + rewards[t]
            returns[t] = self.returns
            if ended[t]:
                self.returns = np.zeros_like(self.returns)
        self.stats.update(returns)
        return np.clip(rewards / self.stats.std, -10.0, 10.0)

    def state_dict(self) -> dict[str, Any]:
        return {"returns": torch.tensor(self.returns), **self.stats.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.returns = state["returns"].numpy().astype(np.float64).copy()
        self.stats.load_state_dict(state)


def ppo_update(
    model: ActorCritic,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    config: IPPOConfig,
    *,
    sync_grads: Callable[[list[nn.Parameter]], int] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Run the PPO epochs on one rollout; returns monitoring metrics (means over mini-batches).

    ``sync_grads(params)`` is called between ``backward`` and the optimiser step (MPI gradient
    averaging, :mod:`marl.distributed`); it returns the bytes it put on the wire. When it has a
    ``grad_scale`` attribute (a :class:`marl.distributed.GradientSync`), the loss is multiplied by
    it before ``backward`` (Horovod's prescale: the allreduce then sums straight to the mean, with
    no averaging pass); it is read for every mini-batch since a rank failure can shrink the world.
    """
    steps = batch.obs.shape[0]
    mb_size = steps // config.num_minibatches
    params = [p for p in model.parameters() if p.requires_grad]
    sums: dict[str, float] = {}
    count = 0
    wire_bytes = 0
    for _ in range(config.update_epochs):
        order = torch.randperm(steps, generator=generator)
        approx_kl = torch.zeros(())
        for start in range(0, mb_size * config.num_minibatches, mb_size):
            idx = order[start : start + mb_size]
            dist, comms_out = model.actor(
                batch.obs[idx],
                None if batch.delivered is None else batch.delivered[idx],
                None if batch.action_mask is None else batch.action_mask[idx],
                gate=None if batch.gates is None else batch.gates[idx],
            )
            new_logprob, entropy = log_prob_entropy(dist, batch.actions[idx])
            if comms_out is not None and comms_out.logprob is not None:
                # The speak/silent gate is part of the joint action (IC3Net).
                new_logprob = new_logprob + comms_out.logprob
                entropy = entropy + comms_out.entropy
            logratio = new_logprob - batch.logprobs[idx]
            ratio = logratio.exp()
            with torch.no_grad():
                # http://joschu.net/blog/kl-approx.html (detail 12)
                approx_kl = ((ratio - 1) - logratio).mean()
                clipfrac = ((ratio - 1.0).abs() > config.clip_coef).float().mean()

            adv = batch.advantages[idx]
            if config.norm_adv:
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            pg_loss = torch.max(
                -adv * ratio, -adv * torch.clamp(ratio, 1 - config.clip_coef, 1 + config.clip_coef)
            ).mean()

            new_value = model.value(batch.critic_in[idx])
            returns = batch.returns[idx]
            if config.clip_vloss:
                old = batch.values[idx]
                clipped = old + torch.clamp(new_value - old, -config.clip_coef, config.clip_coef)
                v_loss = 0.5 * torch.max((new_value - returns) ** 2, (clipped - returns) ** 2).mean()
            else:
                v_loss = 0.5 * ((new_value - returns) ** 2).mean()
            entropy_loss = entropy.mean()
            loss = pg_loss - config.ent_coef * entropy_loss + config.vf_coef * v_loss

            optimizer.zero_grad(set_to_none=False)
            grad_scale = getattr(sync_grads, "grad_scale", 1.0)
            (loss * grad_scale if grad_scale != 1.0 else loss).backward()
            if sync_grads is not None:
                wire_bytes += sync_grads(params)
            nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()

            for key, value in (("policy_loss", pg_loss), ("value_loss", v_loss), ("entropy", entropy_loss),
                               ("approx_kl", approx_kl), ("clipfrac", clipfrac)):
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            count += 1
        if config.target_kl is not None and float(approx_kl) > config.target_kl:
            break
    metrics = {k: v / max(count, 1) for k, v in sums.items()}
    values, returns = batch.values.flatten(), batch.returns.flatten()
    var_y = float(returns.var())
    metrics["explained_variance"] = float("nan") if var_y == 0 else 1.0 - float((returns - values).var()) / var_y
    metrics["grad_sync_bytes"] = float(wire_bytes)
    return metrics


class IPPO:
    """Registry entry for ``--algo ippo``: the config class and the critic's input."""

    name: ClassVar[str] = "ippo"
    Config: ClassVar[type] = IPPOConfig
    #: False: the critic sees the agent's own observation; True: the global ``env.state()``.
    centralised_critic: ClassVar[bool] = False
    update: ClassVar[Callable[..., dict[str, float]]] = staticmethod(ppo_update)
