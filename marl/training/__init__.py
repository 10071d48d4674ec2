"""Training: ``marl train`` and the training cells of ``marl compare``.

Read :mod:`marl.training.loop` first: the on-policy loop (IPPO, MAPPO), top to bottom;
:mod:`~marl.training.offpolicy` is the replay loop of off-policy algorithms (IDQN), chosen by the
algorithm class's ``off_policy`` attribute. The pieces it uses, one
file each: :mod:`~marl.training.request` (what is asked, validated once), :mod:`~marl.training.layout`
(dicts <-> team arrays), :mod:`~marl.training.communication` (protocol + channel as the policy
sees them), :mod:`~marl.training.model` (network, batched acting), :mod:`~marl.training.rollout`
(the training episode in progress), :mod:`~marl.training.buffer` (rollout storage),
:mod:`~marl.training.checkpoint`, :mod:`~marl.training.policy` (a trained policy as a controller),
:mod:`~marl.training.evaluation` and :mod:`~marl.training.log` (records and manifest). The PPO
maths (GAE, normalisers, update) is in :mod:`marl.algos.ppo`; the DQN maths (replay, n-step
returns, double-DQN update) in :mod:`marl.algos.idqn`.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the module defining it. Imported on first use (PEP 562), so the CLI can read
#: TrainRequest's defaults without importing torch.
_EXPORTS = {
    "train": "loop",
    "TrainRequest": "request",
    "TrainPlan": "request",
    "TrainResult": "request",
    "prepare": "request",
    "request_default": "request",
    "algorithm_class": "request",
    "algorithm_config": "request",
    "check_ranks": "request",
    "policy_controller": "policy",
    "PolicyController": "policy",
    "load_checkpoint": "checkpoint",
    "resolve_checkpoint": "checkpoint",
    "CHECKPOINT_DIR": "checkpoint",
}

__all__ = [
    "CHECKPOINT_DIR",
    "PolicyController",
    "TrainPlan",
    "TrainRequest",
    "TrainResult",
    "algorithm_class",
    "algorithm_config",
    "check_ranks",
    "load_checkpoint",
    "policy_controller",
    "prepare",
    "request_default",
    "resolve_checkpoint",
    "train",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'marl.training' has no attribute {name!r}")
    return getattr(importlib.import_module(f"marl.training.{_EXPORTS[name]}"), name)
