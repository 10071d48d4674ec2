"""The training episode in progress: inputs the policy sees, one environment step, and how an
interrupted episode is restored on ``--resume``.

Training episode ``k`` of rank ``r`` is reset with ``train_episode_seed(seed, r, k)``
(:mod:`marl.core.seeding`), a stream held out from every evaluation episode; with ``--envs K``
(:class:`TrainingEpisodes`) env ``j`` of the rank plays ``train_env_episode_seed(seed, r, j, k)``
(env 0: the same stream as without ``--envs``). Checkpoints are
written between updates, usually in the middle of an episode; :meth:`TrainingEpisode.state_dict`
saves the actions sent to the environment since the episode began, and
:meth:`TrainingEpisode.load_state_dict` replays them after the same reset. The simulators are
deterministic for a given seed and action sequence, and the channel draws the same masks when
asked in the same order, so a resumed single-rank run continues exactly where the interrupted one
was (ranks > 0 of a multi-rank run start a fresh episode: only rank 0's episode is saved). With
``--envs K`` the episodes of envs 1..K-1 are saved and replayed the same way
(:meth:`TrainingEpisodes.worker_states`); a run resumes only with the K it was written with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from marl.core.errors import ConcordError
from marl.core.seeding import train_env_episode_seed
from marl.training.communication import Communication
from marl.training.layout import TeamLayout, check_team

__all__ = ["StepOutcome", "TrainingEpisode", "TrainingEpisodes"]


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
        env_index: int = 0,
    ) -> None:
        self.env, self.layout, self.comm, self.scenario_id = env, layout, comm, scenario_id
        self.seed, self.rank, self.centralised = seed, rank, centralised_critic
        self.env_index = env_index  #: which of the rank's envs (``--envs``) plays this stream
        self._sent: Any = None  # what send()/start_send() handed over, for receive()/start_receive()
        self.episodes_done = episodes_done  #: finished training episodes (numbers the next one)
        self.observations: dict[str, Any] = {}
        self.infos: dict[str, Any] = {}
        self.episode_return = np.zeros(layout.n)  #: summed raw reward per agent so far
        self.actions: list[np.ndarray] = []  #: env actions since the episode began (for resume)

    def start(self) -> None:
        """Reset the environment and the channel for the next training episode."""
        self.start_send()
        self.start_receive()

    def start_send(self) -> None:
        """Begin :meth:`start` (an env in a worker process resets meanwhile)."""
        self._sent = train_env_episode_seed(self.seed, self.rank, self.env_index, self.episodes_done)
        if hasattr(self.env, "send"):  # scenarios.vector.ProcessEnv
            self.env.send("reset", seed=self._sent)

    def start_receive(self) -> None:
        """Finish :meth:`start`."""
        s = self._sent
        if hasattr(self.env, "send"):
            self.observations, self.infos = self.env.receive()
        else:
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
        self.send(env_action)
        return self.receive()

    def send(self, env_action: np.ndarray) -> None:
        """Begin :meth:`step` (an env in a worker process steps meanwhile)."""
        self.actions.append(np.array(env_action))
        self._sent = self.layout.actions_dict(env_action)
        if hasattr(self.env, "send"):
            self.env.send("step", self._sent)

    def receive(self) -> StepOutcome:
        """Finish :meth:`step`."""
        layout = self.layout
        answer = self.env.receive() if hasattr(self.env, "send") else self.env.step(self._sent)
        self.observations, rewards, terms, truncs, self.infos = answer
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


class TrainingEpisodes:
    """A rank's ``K`` training envs (``marl train --envs K``) stepped as one batch.

    Env 0 is the rank's own env, in this process (evaluation uses it too); envs 1..K-1 each run in
    a worker process behind :class:`scenarios.vector.ProcessEnv` (libsumo holds one simulation per
    process). Each env has its own :class:`TrainingEpisode` (its own seed stream,
    ``train_env_episode_seed(seed, rank, k, episode)``) and its own :class:`Communication`, so
    messages never cross envs. A step sends the actions to the workers first, steps env 0 here,
    then collects the workers' answers: the K simulations run at once. Batched arrays are
    ``[K, N, ...]``; with ``K = 1`` there is no worker and every array is today's with a leading 1.
    """

    def __init__(self, episodes: list[TrainingEpisode]) -> None:
        self.episodes = episodes
        self.seconds = 0.0  #: wall time spent in the envs' resets and steps (all envs at once)
        self._cpu_mark: list[float] = []

    def mark(self) -> None:
        """Start counting here: zero :attr:`seconds`, note the CPU used so far (after start-up)."""
        self.seconds = 0.0
        self._cpu_mark = self._cpu()

    def _cpu(self) -> list[float]:
        return [time.process_time()] + [ep.env.cpu_seconds() for ep in self.episodes[1:]]

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds since :meth:`mark`: this process (``main``, its env 0 and the learner) and
        the worker processes together (``workers``); what the manifest records as ``cpu_seconds``."""
        now = self._cpu()
        mark = self._cpu_mark or [0.0] * len(now)
        return {"main": now[0] - mark[0], "workers": sum(now[1:]) - sum(mark[1:])}

    @classmethod
    def open(
        cls, env: Any, layout: TeamLayout, comm: Communication, request: Any, rank: int, centralised: bool
    ) -> TrainingEpisodes:
        """Env 0 (``env``, talking through ``comm``) and ``request.envs - 1`` worker envs of
        ``request``'s scenario, each with a copy of ``comm``."""
        from scenarios.vector import ProcessEnv

        comms = [comm] + [comm.copy() for _ in range(request.envs - 1)]
        talks = comm.channel is not None or comm.runtime is not None
        wanted = tuple(name for name, need in (("topology", talks), ("state", centralised)) if need)
        envs = [env] + [
            ProcessEnv(request.scenario, request.overrides, test=request.test, wanted=wanted)
            for _ in range(len(comms) - 1)
        ]  # all workers start at once; the first reset waits for each
        return cls(
            [
                TrainingEpisode(e, layout, c, request.scenario, request.seed, rank, centralised, env_index=k)
                for k, (e, c) in enumerate(zip(envs, comms))
            ]
        )

    def __len__(self) -> int:
        return len(self.episodes)

    def start(self, which: list[int] | None = None) -> None:
        """Start the next episode of envs ``which`` (default: all), resetting them at once."""
        tick = time.perf_counter()
        chosen = [self.episodes[k] for k in (range(len(self)) if which is None else which)]
        for ep in chosen:  # the workers reset while env 0 (this process) resets in start_receive
            ep.start_send()
        for ep in chosen:
            ep.start_receive()
        self.seconds += time.perf_counter() - tick

    def inputs(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray]:
        """:meth:`TrainingEpisode.inputs` of every env, stacked ``[K, N, ...]``."""
        parts = [ep.inputs() for ep in self.episodes]
        return tuple(None if p[0] is None else np.stack(p) for p in zip(*parts))  # type: ignore[return-value]

    def count_bytes(self, bytes_sent: Any) -> None:
        """A learned module's bytes ``[K, N]`` for this step, counted by each env's channel."""
        for ep, sent in zip(self.episodes, bytes_sent):
            ep.comm.count_bytes(sent)

    def step(self, env_actions: np.ndarray) -> list[StepOutcome]:
        """One step of every env (``env_actions`` [K, N, ...]); the caller restarts ended ones."""
        tick = time.perf_counter()
        for ep, action in zip(self.episodes, env_actions):
            ep.send(action)
        # env 0 steps here (in its receive) while the workers step theirs
        outcomes = [ep.receive() for ep in self.episodes]
        self.seconds += time.perf_counter() - tick
        return outcomes

    def critic_after(self, last_obs: np.ndarray) -> np.ndarray:
        """:meth:`TrainingEpisode.critic_after` of every env, ``[K, N, C]``."""
        return np.stack([ep.critic_after(obs) for ep, obs in zip(self.episodes, last_obs)])

    # -- resume: env 0's episode is the checkpoint's ``episode``; these are envs 1..K-1's
    def worker_states(self) -> list[dict[str, Any]]:
        """:meth:`TrainingEpisode.state_dict` of envs 1..K-1 (a checkpoint's ``env_episodes``)."""
        return [ep.state_dict() for ep in self.episodes[1:]]

    def load_worker_states(self, saved: list[dict[str, Any]] | None) -> None:
        """Replay the saved episodes of envs 1..K-1 (None: start fresh ones, as ranks > 0 do)."""
        for k, ep in enumerate(self.episodes[1:]):
            if saved is not None and k < len(saved):
                ep.load_state_dict(saved[k])
            else:
                ep.start()

    def close(self) -> None:
        """Stop the worker envs (env 0 belongs to the caller)."""
        for ep in self.episodes[1:]:
            ep.env.close()
