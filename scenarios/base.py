"""The contract every Concord scenario keeps, on top of PettingZoo's ParallelEnv.

A scenario is a ``pettingzoo.ParallelEnv`` that passes ``pettingzoo.test.parallel_api_test``
(and, through ``parallel_to_aec``, ``api_test``) and also offers:

* ``Config`` — a dataclass, the single source of the scenario's parameters (types, defaults,
  help). The registry builds it from presets and ``--set`` overrides and passes it to
  ``__init__(config)``; ``__init__`` also takes ``render_mode`` (None by default).
* agent ids of the form ``<kind>_<i>`` (``light_3``, ``pv_0``, ``robot_7``), so that clients
  which group agents by kind (TorchRL, BenchMARL) see one group per kind; :attr:`sim_ids` maps
  each id to the simulator's own name of the agent, :attr:`group_map` lists the groups.
* ``topology`` — a ``networkx.Graph`` over ``possible_agents``: who can talk to whom, with edge
  attributes such as ``distance``. Protocols and consensus read only this, never the simulator.
  It may change from step to step (moving robots); readers fetch it every step.
* ``episode_kpis()`` — the domain's own measures for the episode that just finished.
* ``state()`` — a flat float32 vector of the global state, for centralised critics, inside
  ``state_space`` (a ``gymnasium.spaces.Box``; PettingZoo's ``state_test`` reads it).
* ``main_kpi`` / ``kpi_goals`` — the headline KPI and whether lower or higher is better, used by
  progress bars and report tables.
* explicit seeding: ``reset(seed=s)`` with the same ``s`` gives the same episode, to the last KPI.
* discrete-action scenarios with invalid actions put an ``action_mask`` in each agent's
  ``infos`` entry: ``np.int8``, one entry per action, 1 = allowed (the dtype Gymnasium's
  ``Discrete.sample(mask)`` takes).
* independent copies: a pickled, deep-copied or forked env shares no files, ports or simulator
  handles with the original (simulator resources are created by ``reset``, never by
  ``__init__``).

:mod:`marl.testing` checks all of this on any scenario (``check_scenario``).
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Literal

import networkx as nx
import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from marl.core.errors import ConfigError

__all__ = ["Scenario", "group_of"]


def group_of(agent: str) -> str:
    """The kind of an agent id ``<kind>_<i>``: ``group_of("light_3") == "light"``."""
    return agent.rsplit("_", 1)[0]


class Scenario(ParallelEnv):
    """Base class of Concord scenarios (see the module docstring for the contract)."""

    #: The config dataclass; subclasses override it.
    Config: ClassVar[type]
    #: Name of the headline KPI in :meth:`episode_kpis`.
    main_kpi: ClassVar[str] = ""
    #: For each KPI, whether smaller ("min") or larger ("max") is better.
    kpi_goals: ClassVar[dict[str, Literal["min", "max"]]] = {}

    metadata: dict[str, Any] = {"name": "concord_scenario", "render_modes": [], "is_parallelizable": True}
    #: How :meth:`render` draws (one of ``metadata["render_modes"]``), or None: no rendering.
    render_mode: str | None = None
    #: Box of :meth:`state`; subclasses set it in ``__init__``.
    state_space: spaces.Box

    def _set_render_mode(self, render_mode: str | None) -> None:
        """Validate and keep the constructor's ``render_mode`` argument."""
        allowed = list(self.metadata.get("render_modes", []))
        if render_mode is not None and render_mode not in allowed:
            shown = ", ".join(allowed) if allowed else "none (only None)"
            raise ConfigError(f"bad render_mode '{render_mode}'; allowed: {shown}")
        self.render_mode = render_mode

    def render(self) -> Any:
        """Draw the current state in ``render_mode``; without one, warn and return None."""
        warnings.warn(
            f"{type(self).__name__}.render(): no render_mode set (allowed: "
            f"{list(self.metadata.get('render_modes', [])) or 'none'}); nothing is drawn",
            stacklevel=2,
        )
        return None

    @property
    def sim_ids(self) -> dict[str, str]:
        """Concord agent id -> the simulator's own id of that agent (SUMO light id, ...).

        Identity unless a scenario renames its agents. Records, checkpoints and topology use
        the Concord ids; this map is how to find an agent in the simulator's files.
        """
        return {a: a for a in self.possible_agents}

    @property
    def group_map(self) -> dict[str, list[str]]:
        """Agents grouped by kind (``{"light": ["light_0", ...]}``), in ``possible_agents`` order.

        Pass it to TorchRL's ``PettingZooWrapper(env, group_map=env.group_map)`` to get one
        group per kind of agent (TorchRL's default groups by the same prefix).
        """
        groups: dict[str, list[str]] = {}
        for agent in self.possible_agents:
            groups.setdefault(group_of(agent), []).append(agent)
        return groups

    @property
    def topology(self) -> nx.Graph:  # pragma: no cover - every scenario overrides it
        raise NotImplementedError

    def episode_kpis(self) -> dict[str, float]:  # pragma: no cover
        raise NotImplementedError

    def state(self) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        """Release the simulator; safe to call twice."""
