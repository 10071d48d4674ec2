"""The rollout buffer: ``T`` steps of ``K`` envs of ``N`` agents, filled step by step, handed to
the update as one :class:`marl.algos.ppo.Batch`; reward scaling and GAE per env."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from marl.algos.ppo import Batch, RewardScaler, compute_gae

__all__ = ["EnvRewardScaler", "RolloutBuffer", "env_advantages"]


class RolloutBuffer:
    """Numpy arrays for one rollout of ``K`` envs (``--envs``; 1 by default) of ``N`` agents.
    Shapes: ``obs`` [T,K,N,D] actor inputs (with rule-based messages), ``critic`` [T,K,N,C],
    ``delivered`` [T,K,N,N] learned-protocol masks (or None), ``amask`` [T,K,N,A] discrete action
    masks (or None), ``actions`` [T,K,N] or [T,K,N,A], ``gates`` [T,K,N] speak choices of a gated
    protocol, ``logp`` [T,K,N], ``values`` [T,K,N] critic values in reward units, ``raw`` [T,K,N]
    unscaled rewards, ``boot`` [T,K,N] ``gamma * V(s_T)`` added at a time-limit truncation
    (critic units), ``end`` [T,K] True when env k's episode ended at step t.

    Each env's agents are their own columns: returns and advantages run along ``T`` per env with
    that env's episode ends (:func:`env_advantages`), and the update sees ``T * K`` team samples
    (:meth:`batch`), each one env's ``N`` agents, so messages are only mixed within one env."""

    def __init__(
        self,
        steps: int,
        n: int,
        obs_dim: int,
        critic_dim: int,
        action_dim: int,
        discrete: bool,
        learned: bool,
        envs: int = 1,
    ) -> None:
        tk = (steps, envs)
        self.obs = np.zeros((*tk, n, obs_dim), np.float32)
        self.critic = np.zeros((*tk, n, critic_dim), np.float32)
        self.delivered = np.zeros((*tk, n, n), bool) if learned else None
        self.amask = np.zeros((*tk, n, action_dim), bool) if discrete else None
        self.actions = np.zeros((*tk, n), np.int64) if discrete else np.zeros((*tk, n, action_dim), np.float32)
        self.gates = np.zeros((*tk, n), np.int64)
        self.has_gates = False
        self.logp = np.zeros((*tk, n), np.float32)
        self.values = np.zeros((*tk, n), np.float64)
        self.raw = np.zeros((*tk, n), np.float64)
        self.boot = np.zeros((*tk, n), np.float64)
        self.end = np.zeros(tk, bool)

    @classmethod
    def for_team(cls, steps: int, layout: Any, comm: Any, critic_dim: int, envs: int = 1) -> RolloutBuffer:
        """A buffer for ``steps`` steps of ``envs`` copies of the team ``layout`` talking through ``comm``."""
        obs_dim = layout.obs_dim + comm.message_size  # rule-based messages extend the observation
        return cls(
            steps, layout.n, obs_dim, critic_dim, layout.action_dim, layout.kind == "discrete", comm.learned, envs
        )

    def store(
        self,
        t: int,
        obs: np.ndarray,
        critic_in: np.ndarray,
        delivered: np.ndarray | None,
        amask: np.ndarray | None,
        action: np.ndarray,
        logprob: np.ndarray,
        value: np.ndarray,
        gate: np.ndarray | None,
    ) -> None:
        """What the policy saw and did at step ``t`` (before the environment answered)."""
        self.obs[t], self.critic[t], self.logp[t], self.values[t], self.actions[t] = (
            obs,
            critic_in,
            logprob,
            value,
            action,
        )
        if self.delivered is not None and delivered is not None:
            self.delivered[t] = delivered
        if self.amask is not None and amask is not None:
            self.amask[t] = amask
        if gate is not None:
            self.gates[t], self.has_gates = gate, True

    def record(self, t: int, outcomes: list[Any], boots: list[Any]) -> None:
        """The envs' answers at step ``t``: a :class:`~marl.training.rollout.StepOutcome` and a
        truncation bootstrap (array [N] or 0) per env."""
        for k, (out, boot) in enumerate(zip(outcomes, boots)):
            self.raw[t, k], self.end[t, k], self.boot[t, k] = out.reward, out.ended, boot

    def batch(self, values: np.ndarray, advantages: np.ndarray, returns: np.ndarray) -> Batch:
        """The rollout as torch tensors (copies: the buffer is refilled while they live)."""

        def tensor(a: np.ndarray, dtype: Any = None) -> torch.Tensor:
            a = a.reshape(-1, *a.shape[2:])  # [T, K, ...] -> [T * K, ...]: row t * K + k
            return torch.from_numpy(a.astype(dtype) if dtype is not None else a.copy())

        def optional(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else tensor(a)

        return Batch(
            obs=tensor(self.obs),
            critic_in=tensor(self.critic),
            delivered=optional(self.delivered),
            action_mask=optional(self.amask),
            actions=tensor(self.actions),
            gates=tensor(self.gates) if self.has_gates else None,
            logprobs=tensor(self.logp),
            values=tensor(values, np.float32),
            advantages=tensor(advantages, np.float32),
            returns=tensor(returns, np.float32),
        )


class EnvRewardScaler(RewardScaler):
    """:class:`~marl.algos.ppo.RewardScaler` over ``K`` envs: each env's discounted return is
    reset at its own episode ends; one running std over all. ``returns`` is flat ``[K * N]`` (with
    ``K = 1`` exactly the parent's state and arithmetic, so checkpoints and runs are unchanged)."""

    def __init__(self, n_agents: int, gamma: float, envs: int = 1) -> None:
        super().__init__(n_agents * envs, gamma)
        self.envs = envs

    def scale_rollout(self, rewards: np.ndarray, ended: np.ndarray) -> np.ndarray:
        """Scale a rollout's rewards [T, K, N] (``ended[t, k]``: env k's episode ended at step t)."""
        running = self.returns.reshape(self.envs, -1)
        returns = np.empty_like(rewards, dtype=np.float64)
        for t in range(rewards.shape[0]):
            running = running * self.gamma + rewards[t]
            returns[t] = running
            running = np.where(ended[t][:, None], 0.0, running)
        self.returns = running.reshape(-1)
        self.stats.update(returns)
        return np.clip(rewards / self.stats.std, -10.0, 10.0)


def env_advantages(
    rewards: np.ndarray, values: np.ndarray, ended: np.ndarray, last_value: np.ndarray, gamma: float, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`~marl.algos.ppo.compute_gae` for each env on its own (``[T, K, N]`` arrays,
    ``ended`` [T, K], ``last_value`` [K, N]): exact, since every env's agents are separate columns
    with their own episode ends. Returns (advantages, returns) [T, K, N]."""
    parts = [
        compute_gae(rewards[:, k], values[:, k], ended[:, k], last_value[k], gamma, lam) for k in range(ended.shape[1])
    ]
    return np.stack([p[0] for p in parts], 1), np.stack([p[1] for p in parts], 1)
