"""The one episode loop: reset, then act and step until every agent is done, then read the KPIs.

``marl run`` (:mod:`marl.runner`), the evaluation of a trained policy (:mod:`marl.training.evaluation`)
and ``marl bench`` all play their episodes through :func:`run_episode`, so a controller and a trained
policy are scored by exactly the same code on exactly the same seeds (:mod:`marl.core.seeding`).
This module imports neither the runner nor the training package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from marl.core.controller import Controller

__all__ = ["run_episode"]


def run_episode(
    env: Any,
    controller: Controller,
    comms: Any = None,
    *,
    seed: int,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """One episode reset with ``seed``; returns the scenario's KPIs plus ``return``, ``env_steps``
    and, with comms (or a policy that talks through its own channel), the channel's statistics.

    ``return`` is the undiscounted episode reward summed over steps, averaged over agents;
    ``env_steps`` counts decisions (one step = every agent acts once).
    """
    observations, _ = env.reset(seed=seed)
    controller.reset(env, seed)
    if comms is not None:
        comms.reset(env.topology)
    reward_sum: dict[str, float] = dict.fromkeys(env.possible_agents, 0.0)
    steps = 0
    while env.agents:
        messages = None
        if comms is not None:
            messages = comms.exchange(controller.payload(observations, env), env.topology)
        actions = controller.act(observations, env, messages)
        observations, rewards, _, _, _ = env.step(actions)
        for agent, reward in rewards.items():
            reward_sum[agent] += float(reward)
        steps += 1
        if on_step is not None:
            on_step(steps)
    kpis = {k: float(v) for k, v in env.episode_kpis().items()}
    kpis["return"] = float(np.mean(list(reward_sum.values()))) if reward_sum else 0.0
    kpis["env_steps"] = float(steps)
    if comms is not None:
        kpis.update({k: float(v) for k, v in comms.stats().items()})
    # Trained policies with learned protocols count their own bytes (a gate that stays silent
    # sends nothing); they report them here.
    episode_stats = getattr(controller, "episode_stats", None)
    if episode_stats is not None:
        kpis.update({k: float(v) for k, v in episode_stats().items()})
    return kpis
