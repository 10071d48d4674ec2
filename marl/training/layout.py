"""The team as one tensor: PettingZoo's per-agent dicts <-> padded ``[N, ...]`` arrays.

Learners batch the whole team in one forward pass, so every agent's observation is flattened and
zero-padded to the largest size, and every agent's action is one row of an ``[N]`` (discrete) or
``[N, A]`` (continuous) array. :class:`TeamLayout` records that mapping; it is saved in every
checkpoint so a policy can only be loaded onto a team it fits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from marl.core.errors import ConcordError, ConfigError

__all__ = ["TeamLayout", "check_team"]


@dataclass
class TeamLayout:
    """How the scenario's per-agent spaces map onto one padded team tensor.

    Observations are flattened and zero-padded to the largest size; discrete action spaces of
    different sizes become one ``Discrete(max)`` whose extra choices are masked out; continuous
    actions must share one Box shape (``low``/``high`` its bounds). ``state_size`` is the length
    of ``env.state()`` when a centralised critic needs it, else 0.
    """

    agents: list[str]
    obs_sizes: list[int]
    kind: str  #: "discrete" | "continuous"
    action_sizes: list[int]
    low: list[float] = field(default_factory=list)
    high: list[float] = field(default_factory=list)
    state_size: int = 0

    @property
    def n(self) -> int:
        return len(self.agents)

    @property
    def obs_dim(self) -> int:
        return max(self.obs_sizes)

    @property
    def action_dim(self) -> int:
        return max(self.action_sizes)

    @classmethod
    def of(cls, env: Any, scenario_id: str, need_state: bool) -> TeamLayout:
        from gymnasium import spaces

        agents = list(env.possible_agents)
        obs_sizes, action_sizes, kinds = [], [], set()
        low: list[float] = []
        high: list[float] = []
        for agent in agents:
            ospace = env.observation_space(agent)
            if not isinstance(ospace, spaces.Box):
                raise ConfigError(
                    f"scenario {scenario_id}: observation space {type(ospace).__name__} of {agent} "
                    "is not supported; allowed: Box"
                )
            obs_sizes.append(int(np.prod(ospace.shape)))
            aspace = env.action_space(agent)
            if isinstance(aspace, spaces.Discrete):
                kinds.add("discrete")
                action_sizes.append(int(aspace.n))
            elif isinstance(aspace, spaces.Box) and len(aspace.shape) == 1:
                kinds.add("continuous")
                action_sizes.append(int(aspace.shape[0]))
                low, high = aspace.low.astype(float).tolist(), aspace.high.astype(float).tolist()
            else:
                raise ConfigError(
                    f"scenario {scenario_id}: action space {aspace} of {agent} is not supported; "
                    "allowed: Discrete, 1-D Box"
                )
        if len(kinds) != 1:
            raise ConfigError(f"scenario {scenario_id} mixes discrete and continuous actions; not supported")
        kind = kinds.pop()
        if kind == "continuous" and len(set(action_sizes)) != 1:
            raise ConfigError(f"scenario {scenario_id}: agents' Box actions differ in size; not supported")
        state_size = 0
        if need_state:
            try:
                state_size = int(np.asarray(env.state()).size)
            except NotImplementedError:
                raise ConfigError(f"scenario {scenario_id} has no global state(); use --algo ippo") from None
        return cls(agents, obs_sizes, kind, action_sizes, low, high, state_size)

    def obs_array(self, observations: Mapping[str, Any]) -> np.ndarray:
        """``[N, obs_dim]`` float32, each agent's observation flattened and zero-padded."""
        out = np.zeros((self.n, self.obs_dim), dtype=np.float32)
        for i, agent in enumerate(self.agents):
            row = np.asarray(observations[agent], dtype=np.float32).ravel()
            out[i, : row.size] = row
        return out

    def action_masks(self, infos: Mapping[str, Any] | None, env: Any) -> np.ndarray | None:
        """[N, A] bool for discrete actions (padding choices and ``action_mask`` entries False)."""
        if self.kind != "discrete":
            return None
        mask = np.zeros((self.n, self.action_dim), dtype=bool)
        for i, (agent, size) in enumerate(zip(self.agents, self.action_sizes)):
            mask[i, :size] = True
            given = None
            if infos is not None and agent in infos and "action_mask" in infos[agent]:
                given = infos[agent]["action_mask"]
            elif infos is None and hasattr(env, "action_mask"):
                given = env.action_mask(agent)
            if given is not None:
                given = np.asarray(given, dtype=bool).ravel()
                mask[i, : given.size] &= given
                mask[i, given.size :] = False
        return mask

    def actions_dict(self, actions: np.ndarray) -> dict[str, Any]:
        if self.kind == "discrete":
            return {a: int(actions[i]) for i, a in enumerate(self.agents)}
        return {a: actions[i].astype(np.float32) for i, a in enumerate(self.agents)}

    def fits(self, other: TeamLayout, sim_ids: Mapping[str, str] | None = None) -> bool:
        """True when a policy saved with layout ``other`` can act for this team: same spaces and
        the same agents in the same order, named either by their ids or (checkpoints written
        before agents had Concord ids) by the simulator's ids ``sim_ids[agent]``."""
        names = [self.agents]
        if sim_ids:
            names.append([sim_ids.get(a, a) for a in self.agents])
        return other.agents in names and (self.obs_sizes, self.action_sizes, self.kind) == (
            other.obs_sizes,
            other.action_sizes,
            other.kind,
        )

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)


def check_team(env: Any, layout: TeamLayout, scenario_id: str) -> None:
    """IPPO/MAPPO batch a fixed team: agents that join or leave mid-episode are rejected."""
    if env.agents and list(env.agents) != layout.agents:
        missing = sorted(set(layout.agents) - set(env.agents))
        extra = sorted(set(env.agents) - set(layout.agents))
        raise ConcordError(
            f"scenario {scenario_id} changed its team mid-episode (left: {missing or '-'}, joined: "
            f"{extra or '-'}); ippo/mappo need every agent to act every step until the episode ends"
        )
