"""The training episode in progress: inputs the policy sees, one environment step, and how an
interrupted episode is restored on ``--resume``.

Training episode ``k`` of rank ``r`` is reset with ``train_episode_seed(seed, r, k)``
(:mod:`marl.core.seeding`), a stream held out from every evaluation episode. Checkpoints are
written between updates, usually in the middle of an episode; :meth:`TrainingEpisode.state_dict`
saves the actions sent to the environment since the episode began, and
:meth:`TrainingEpisode.load_state_dict` replays them after the same reset. The simulators are
deterministic for a given seed and action sequence, and the channel draws the same masks when
asked in the same order, so a resumed single-rank run continues exactly where the interrupted one
was (ranks > 0 of a multi-rank run start a fresh episode: only rank 0's episode is saved).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from marl.core.errors import ConcordError
from marl.core.seeding import train_episode_seed
from marl.training.communication import Communication
from marl.training.layout import TeamLayout, check_team

__all__ = ["StepOutcome", "TrainingEpisode"]


@dataclass
class StepOutcome:
    """What one environment step returned, in team arrays."""

    reward: np.ndarray  #: [N] raw rewards
    ended: bool  #: every agent is done: the next step starts a new episode
    truncated: np.ndarray  #: [N] True where the episode was cut by a time limit (not terminal)
    final_critic_in: np.ndarray | None  #: critic input of the last state when truncated, else None


class TrainingEpisode:
    """One rank's stream of training episodes on ``env``."""

    def __init__(
        self,
        env: Any,
        layout: TeamLayout,
        comm: Communication,
        scenario_id: str,
        seed: int,
        rank: int,
        centralised_critic: bool,
        episodes_done: int = 0,
    ) -> None:
        self.env, self.layout, self.comm, self.scenario_id = env, layout, comm, scenario_id
        self.seed, self.rank, self.centralised = seed, rank, centralised_critic
        self.episodes_done = episodes_done  #: finished training episodes (numbers the next one)
        self.observations: dict[str, Any] = {}
        self.infos: dict[str, Any] = {}
        self.episode_return = np.zeros(layout.n)  #: summed raw reward per agent so far
        self.actions: list[np.ndarray] = []  #: env actions since the episode began (for resume)

    def start(self) -> None:
        """Reset the environment and the channel for the next training episode."""
        s = train_episode_seed(self.seed, self.rank, self.episodes_done)
        self.observations, self.infos = self.env.reset(seed=s)
        self.comm.reset(self.env, s)
        check_team(self.env, self.layout, self.scenario_id)
        if list(self.env.agents) != self.layout.agents:
            raise ConcordError(f"scenario {self.scenario_id} started an episode without all its agents")
        self.episode_return[:] = 0.0
        self.actions = []

    def _state(self) -> np.ndarray:
        return np.asarray(self.env.state(), np.float32).ravel()[None].repeat(self.layout.n, 0)

    def inputs(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray]:
        """(actor input [N,D], delivery mask [N,N] or None, action mask or None, critic input)
        for this step; draws this step's messages from the channel."""
        obs = self.comm.augment(self.layout.obs_array(self.observations), self.env)
        delivered = self.comm.delivered(self.env)
        amask = self.layout.action_masks(self.infos, self.env)
        return obs, delivered, amask, self._state() if self.centralised else obs

    def step(self, env_action: np.ndarray) -> StepOutcome:
        """Send the team's actions; when the episode ends, count it (the caller starts the next)."""
        layout = self.layout
        self.actions.append(np.array(env_action))
        self.observations, rewards, terms, truncs, self.infos = self.env.step(layout.actions_dict(env_action))
        reward = np.array([float(rewards.get(a, 0.0)) for a in layout.agents])
        self.episode_return += reward
        check_team(self.env, layout, self.scenario_id)
        ended = not self.env.agents
        truncated = np.zeros(layout.n, bool)
        final = None
        if ended:
            self.episodes_done += 1
            # Time-limit truncation is not a terminal state: the caller bootstraps with V(s_T)
            # (Pardo et al. 2018, "Time Limits in Reinforcement Learning").
            truncated = np.array([bool(truncs.get(a, False)) and not bool(terms.get(a, False)) for a in layout.agents])
            if truncated.any():
                final = self._final_critic_input()
        return StepOutcome(reward, ended, truncated, final)

    def _final_critic_input(self) -> np.ndarray:
        if self.centralised:
            return self._state()
        final = (
            self.layout.obs_array(self.observations)
            if self.observations
            else np.zeros((self.layout.n, self.layout.obs_dim), np.float32)
        )
        if self.comm.message_size:  # no messages are drawn for a state nobody acts in
            final = np.concatenate([final, np.zeros((self.layout.n, self.comm.message_size), np.float32)], 1)
        return final

    def critic_after(self, last_obs: np.ndarray) -> np.ndarray:
        """Critic input of the state after a rollout, to bootstrap its last value. Rule-based
        messages of the next step are not drawn yet (that would advance the channel): those of
        ``last_obs`` (the rollout's last actor input) stand in for them."""
        if self.centralised:
            return self._state()
        return np.concatenate([self.layout.obs_array(self.observations), last_obs[:, self.layout.obs_dim :]], 1)

    def kpis(self) -> dict[str, float]:
        """KPIs of the episode that just ended, with the channel's statistics."""
        kpis = {k: float(v) for k, v in self.env.episode_kpis().items()}
        kpis.update(self.comm.stats())
        return kpis

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The episode in progress: its number, the actions so far, the learned bytes counted."""
        shape = (0, self.layout.n) if self.layout.kind == "discrete" else (0, self.layout.n, self.layout.action_dim)
        actions = np.stack(self.actions) if self.actions else np.zeros(shape)
        return {
            "number": self.episodes_done,
            "actions": torch.from_numpy(actions),
            "bytes_module": self.comm.bytes_module,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Start episode ``state['number']`` again and replay its saved actions."""
        self.episodes_done = int(state["number"])
        self.start()
        for action in state["actions"].numpy():
            self.inputs()  # the channel draws what it drew in the interrupted run
            if self.step(action).ended:
                raise ConcordError(
                    "cannot resume: the saved episode ended early on replay "
                    "(the simulator is not deterministic for this scenario)"
                )
        self.comm.bytes_module = float(state["bytes_module"])
