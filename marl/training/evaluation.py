"""Evaluating a policy during and after training, on the seeds of :mod:`marl.core.seeding`.

The final evaluation plays ``episode_seeds(seed, n)`` — exactly the episodes of
``marl run --seed seed --episodes n`` — so a trained policy and every baseline meet the same
traffic; periodic evaluations play :func:`~marl.core.seeding.periodic_eval_seed` episodes, held
out from both training and the final evaluation.
"""

from __future__ import annotations

from typing import Any

from marl.core.seeding import episode_seeds, periodic_eval_seed
from marl.episodes import run_episode
from marl.training.policy import PolicyController

__all__ = ["evaluate", "final_seeds", "periodic_seeds"]


def evaluate(env: Any, policy: PolicyController, seeds: list[int]) -> list[dict[str, float]]:
    """KPIs of one episode per seed, played through ``marl run``'s episode loop; the model is
    put back in training mode afterwards."""
    policy.model.eval()
    results = [run_episode(env, policy, None, seed=s) for s in seeds]
    policy.model.train()
    return results


def final_seeds(seed: int, episodes: int) -> list[int]:
    """The final evaluation's seeds: ``marl run --seed seed --episodes episodes``'s."""
    return episode_seeds(seed, episodes)


def periodic_seeds(seed: int, update: int, episodes: int) -> list[int]:
    """The seeds of the evaluation after update ``update``."""
    return [periodic_eval_seed(seed, update, e) for e in range(episodes)]
