"""Decentralised training on MPI ranks: launch, world, gradient sync, compression, recovery.

The only package in Concord that imports mpi4py, and only when there is more than one rank.
The contract with training (docs/ARCHITECTURE.md, "World and gradient sync"): ``launch_if_needed``
-> ``init_world`` -> ``make_sync``; a
``RankFailure`` from a collective is answered with ``world.recover(model, optimizer)``.
"""

from marl.distributed.config import DistConfig
from marl.distributed.launch import launch_if_needed
from marl.distributed.sync import GradientSync, make_sync
from marl.distributed.world import RankFailure, RanksDivergedError, World, init_world

__all__ = [
    "DistConfig",
    "launch_if_needed",
    "init_world",
    "World",
    "make_sync",
    "GradientSync",
    "RankFailure",
    "RanksDivergedError",
]
