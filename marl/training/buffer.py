"""The rollout buffer: ``T`` steps of ``N`` agents, filled step by step, handed to the update
as one :class:`marl.algos.ppo.Batch`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from marl.algos.ppo import Batch

__all__ = ["RolloutBuffer"]


class RolloutBuffer:
    """Numpy arrays for one rollout. Shapes: ``obs`` [T,N,D] actor inputs (with rule-based
    messages), ``critic`` [T,N,C], ``delivered`` [T,N,N] learned-protocol masks (or None),
    ``amask`` [T,N,A] discrete action masks (or None), ``actions`` [T,N] or [T,N,A], ``gates``
    [T,N] speak choices of a gated protocol, ``logp`` [T,N], ``values`` [T,N] critic values in
    reward units, ``raw`` [T,N] unscaled rewards, ``boot`` [T,N] ``gamma * V(s_T)`` added at a
    time-limit truncation (critic units), ``end`` [T] True when an episode ended at step t."""

    def __init__(
        self, steps: int, n: int, obs_dim: int, critic_dim: int, action_dim: int, discrete: bool, learned: bool
    ) -> None:
        self.obs = np.zeros((steps, n, obs_dim), np.float32)
        self.critic = np.zeros((steps, n, critic_dim), np.float32)
        self.delivered = np.zeros((steps, n, n), bool) if learned else None
        self.amask = np.zeros((steps, n, action_dim), bool) if discrete else None
        self.actions = np.zeros((steps, n), np.int64) if discrete else np.zeros((steps, n, action_dim), np.float32)
        self.gates = np.zeros((steps, n), np.int64)
        self.has_gates = False
        self.logp = np.zeros((steps, n), np.float32)
        self.values = np.zeros((steps, n), np.float64)
        self.raw = np.zeros((steps, n), np.float64)
        self.boot = np.zeros((steps, n), np.float64)
        self.end = np.zeros(steps, bool)

    @classmethod
    def for_team(cls, steps: int, layout: Any, comm: Any, critic_dim: int) -> RolloutBuffer:
        """A buffer for ``steps`` steps of the team ``layout`` talking through ``comm``."""
        obs_dim = layout.obs_dim + comm.message_size  # rule-based messages extend the observation
        return cls(steps, layout.n, obs_dim, critic_dim, layout.action_dim, layout.kind == "discrete", comm.learned)

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

    def record(self, t: int, reward: np.ndarray, ended: bool, boot: np.ndarray | float = 0.0) -> None:
        """The environment's answer at step ``t``."""
        self.raw[t], self.end[t], self.boot[t] = reward, ended, boot

    def batch(self, values: np.ndarray, advantages: np.ndarray, returns: np.ndarray) -> Batch:
        """The rollout as torch tensors (copies: the buffer is refilled while they live)."""

        def tensor(a: np.ndarray, dtype: Any = None) -> torch.Tensor:
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
