"""The PPO pieces IPPO and MAPPO share: the rollout batch, GAE, running normalisers, the update.

Schulman et al. (2017), "Proximal Policy Optimization Algorithms", with the implementation details
of Huang et al. (2022), "The 37 Implementation Details of Proximal Policy Optimization" (numbered
"detail N" in :mod:`marl.algos.ippo`). Nothing here knows about MPI: the training loop hands
:func:`ppo_update` a plain ``sync_grads`` callable and the factor ``grad_scale`` to apply to the
loss (see :mod:`marl.distributed.sync` for why a caller may prescale).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from marl.policies import ActorCritic, log_prob_entropy

__all__ = ["Batch", "PPOSettings", "RewardScaler", "RunningMeanStd", "compute_gae", "ppo_update"]


class PPOSettings(Protocol):
    """The hyper-parameters :func:`ppo_update` reads (IPPO's and MAPPO's configs have them)."""

    update_epochs: int
    num_minibatches: int
    clip_coef: float
    clip_vloss: bool
    norm_adv: bool
    ent_coef: float
    vf_coef: float
    max_grad_norm: float
    target_kl: float | None


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

    def normalise(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std

    def denormalise(self, x: np.ndarray) -> np.ndarray:
        return x * self.std + self.mean

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
    config: PPOSettings,
    *,
    sync_grads: Callable[[list[nn.Parameter]], int] | None = None,
    grad_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Run the PPO epochs on one rollout; returns monitoring metrics (means over mini-batches).

    ``sync_grads(params)`` is called between ``backward`` and the optimiser step (gradient
    averaging across ranks); it returns the bytes it put on the wire. The loss is multiplied by
    ``grad_scale`` before ``backward`` (Horovod's prescale: with ``1 / ranks`` an allreduce SUM is
    already the mean). A rank failure raises out of ``sync_grads``; the caller recovers and calls
    again with the new world's ``grad_scale``.
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
            if comms_out is not None and comms_out.logprob is not None and comms_out.entropy is not None:
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
            (loss * grad_scale if grad_scale != 1.0 else loss).backward()
            if sync_grads is not None:
                wire_bytes += sync_grads(params)
            nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()

            for key, value in (
                ("policy_loss", pg_loss),
                ("value_loss", v_loss),
                ("entropy", entropy_loss),
                ("approx_kl", approx_kl),
                ("clipfrac", clipfrac),
            ):
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
