"""How every command derives its seeds: one place, so ``marl run``, evaluation after training,
``marl compare`` and ``marl bench`` score the same episodes for the same ``--seed``.

Streams (all seeds are 31-bit, since SUMO takes a signed 32-bit int):

* **evaluation episodes** — episode ``e`` of a run seeded ``s``: ``s`` itself for ``e = 0`` and
  ``SeedSequence([s, e])`` for ``e > 0`` (:func:`episode_seed`). ``marl run --seed s
  --episodes k``, the final evaluation of ``marl train --seed s --eval-episodes k`` and every cell
  of ``marl compare`` use exactly these, so a trained policy and a baseline meet the same traffic.
  Seeds ``s`` and ``s + 1`` give independent episodes (the confidence intervals of ``marl report``
  assume independent samples).
* **training episodes** — episode ``k`` of rank ``r`` of a training run seeded ``s``:
  ``SeedSequence([s, r, k, TRAIN])`` (:func:`train_episode_seed`), a stream disjoint from the
  evaluation stream, so evaluation episodes are held out from training.
* **vectorised training** (``marl train --envs K``) — episode ``k`` of env ``j`` of rank ``r``:
  env 0 plays exactly rank ``r``'s stream above (so ``--envs 1`` is unchanged), env ``j > 0``
  ``SeedSequence([s, r, k, TRAIN, j])`` (:func:`train_env_episode_seed`): the training entropy
  extended by the env index, so every (rank, env) pair has its own stream, independent of ``K``
  (adding envs never changes the episodes of the others), and all of them stay held out.
* **periodic evaluation** during training — ``SeedSequence([s, u, e, PERIODIC])`` for update ``u``
  (:func:`periodic_eval_seed`): also held out, and not the final evaluation's episodes.
* **ranks** — rank ``r`` seeds its action sampling with :func:`rank_seed` (rank 0: ``s``).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "episode_seed",
    "episode_seeds",
    "train_episode_seed",
    "train_env_episode_seed",
    "periodic_eval_seed",
    "rank_seed",
]

#: Stream tags: a SeedSequence entropy word that keeps the streams apart.
TRAIN = 0x7452  # "tR"
PERIODIC = 0x7045  # "pE"
RANK = 0x724B  # "rK"

_MAX = 2**31 - 1


def _draw(*entropy: int) -> int:
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0] >> 1) % _MAX


def episode_seed(seed: int, episode: int) -> int:
    """The env seed of evaluation episode ``episode`` of a run seeded ``seed``."""
    if episode == 0:
        return seed
    return _draw(seed, episode)


def episode_seeds(seed: int, episodes: int) -> list[int]:
    """``[episode_seed(seed, e) for e in range(episodes)]``: what ``marl run`` plays."""
    return [episode_seed(seed, e) for e in range(episodes)]


def train_episode_seed(seed: int, rank: int, episode: int) -> int:
    """The env seed of training episode ``episode`` on rank ``rank`` (held out from evaluation)."""
    return _draw(seed, rank, episode, TRAIN)


def train_env_episode_seed(seed: int, rank: int, env: int, episode: int) -> int:
    """The env seed of training episode ``episode`` of env ``env`` of rank ``rank`` when one rank
    rolls out several envs at once; env 0 is :func:`train_episode_seed` itself."""
    if env == 0:
        return train_episode_seed(seed, rank, episode)
    return _draw(seed, rank, episode, TRAIN, env)


def periodic_eval_seed(seed: int, update: int, episode: int) -> int:
    """The env seed of episode ``episode`` of the evaluation after update ``update``."""
    return _draw(seed, update, episode, PERIODIC)


def rank_seed(seed: int, rank: int) -> int:
    """The torch seed for rank ``rank``'s action sampling (rank 0 keeps ``seed``)."""
    return seed if rank == 0 else _draw(seed, rank, RANK)
