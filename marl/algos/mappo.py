"""MAPPO: PPO with a centralised critic on the global state (Yu et al. 2022).

Yu, Velu, Vinitsky, Gao, Wang, Bayen & Wu (2022), "The Surprising Effectiveness of PPO in
Cooperative Multi-Agent Games", NeurIPS Datasets & Benchmarks. Actors are IPPO's — decentralised,
acting on local observations (plus whatever the communication protocol delivers) — but the critic
is trained on ``env.state()``, the scenario's global state, concatenated with the agent's one-hot
id (the paper's "agent-specific global state", Sec. 4, simplified to state + id). The critic is
only used in training, so execution stays decentralised.

The loss and update are exactly IPPO's (:func:`marl.algos.ppo.ppo_update`); what differs is the
critic input and the defaults the paper recommends:

* value normalisation (Sec. 4 "value normalization": the critic learns normalised returns with a
  running mean/std, PopArt-style without the output rescaling);
* fewer epochs (5-15 on hard tasks; we keep 4 — CPU time) and clip 0.2 (Sec. 4 "PPO clipping").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from marl.algos.ippo import IPPOConfig
from marl.algos.ppo import ppo_update

__all__ = ["MAPPO", "MAPPOConfig"]


@dataclass
class MAPPOConfig(IPPOConfig):
    """Hyper-parameters of MAPPO: IPPO's, with value normalisation on by default."""

    norm_value: bool = field(default=True, metadata={"help": "train the critic on normalised returns (Yu et al. 2022)"})


class MAPPO:
    """Registry entry for ``--algo mappo``: IPPO's update with a centralised critic."""

    name: ClassVar[str] = "mappo"
    Config: ClassVar[type] = MAPPOConfig
    centralised_critic: ClassVar[bool] = True
    update: ClassVar[Callable[..., dict[str, float]]] = staticmethod(ppo_update)
