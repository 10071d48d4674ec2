"""The contract every Concord scenario keeps, on top of PettingZoo's ParallelEnv.

A scenario is a ``pettingzoo.ParallelEnv`` that passes ``pettingzoo.test.parallel_api_test`` and
also offers:

* ``Config`` — a dataclass, the single source of the scenario's parameters (types, defaults,
  help). The registry builds it from presets and ``--set`` overrides and passes it to
  ``__init__(config)``.
* ``topology`` — a ``networkx.Graph`` over ``possible_agents``: who can talk to whom, with edge
  attributes such as ``distance``. Protocols and consensus read only this, never the simulator.
  It may change from step to step (moving robots); readers fetch it every step.
* ``episode_kpis()`` — the domain's own measures for the episode that just finished.
* ``state()`` — a flat float32 vector of the global state, for centralised critics.
* ``main_kpi`` / ``kpi_goals`` — the headline KPI and whether lower or higher is better, used by
  progress bars and report tables.
* explicit seeding: ``reset(seed=s)`` with the same ``s`` gives the same episode, to the last KPI.
* discrete-action scenarios with invalid actions put a boolean ``action_mask`` (one entry per
  action, True = allowed) in each agent's ``infos`` entry.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import networkx as nx
import numpy as np
from pettingzoo import ParallelEnv

__all__ = ["Scenario"]


class Scenario(ParallelEnv):
    """Base class of Concord scenarios (see the module docstring for the contract)."""

    #: The config dataclass; subclasses override it.
    Config: ClassVar[type]
    #: Name of the headline KPI in :meth:`episode_kpis`.
    main_kpi: ClassVar[str] = ""
    #: For each KPI, whether smaller ("min") or larger ("max") is better.
    kpi_goals: ClassVar[dict[str, Literal["min", "max"]]] = {}

    metadata: dict[str, Any] = {"name": "concord_scenario", "render_modes": [], "is_parallelizable": True}

    @property
    def topology(self) -> nx.Graph:  # pragma: no cover - every scenario overrides it
        raise NotImplementedError

    def episode_kpis(self) -> dict[str, float]:  # pragma: no cover
        raise NotImplementedError

    def state(self) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        """Release the simulator; safe to call twice."""
