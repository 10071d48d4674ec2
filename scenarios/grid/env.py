"""Env card: multi-agent voltage control with PV inverters on real distribution feeders.

Description
    Each agent is an inverter-based PV generator on a distribution feeder. Every 15 minutes it
    sets its reactive power (and, with ``curtail=true``, how much of the available active power
    it sheds) to keep every bus voltage within [``v_min``, ``v_max``] (0.95-1.05 p.u., EN 50160)
    at little reactive effort — the task of MAPDN (Wang et al., NeurIPS 2021) on SimBench feeders
    (Meinecke et al., Energies 2020) with their year of 15-minute load and PV profiles. The AC
    power flow is solved by lightsim2grid (Newton-Raphson, model built once, warm-started every
    solve; voltages equal pandapower ``runpp``'s within 1e-7 p.u. on every bus, see ``feeder.py``).

Agents
    ``pv_<i>``, one per controllable PV sgen of the feeder, in sgen order (``agent_bus`` gives
    each one's bus, ``agent_sgens`` its sgen row; ``sim_ids`` is the identity and records use
    these ids). 1-MV-rural: the two MV PV plants and the 90 aggregated rooftop-PV units of
    the LV grids below the MV buses (92); LV feeders: their PV units; ieee33: six units.

Observation (float32 Box, 7 values, or 8 with ``curtail``), per agent:
    ``[v, p_load, q_load, p_pv, sin(tod), cos(tod), last_q_action, (last_curtail_action)]``
    ``v`` is the agent's bus voltage (p.u., clipped to [0, 2]) measured at the start of the
    interval with the previous set-points held; ``p_load``/``q_load`` the load at its bus and
    ``p_pv`` its available PV power in the interval, all divided by the inverter rating ``S``
    (clipped to [-50, 50]); ``tod`` the time of day (2π·k/96); last actions as applied (clipped;
    in residual mode the resulting absolute ``q/q_avail``). With ``v_obs=deviation`` entry 0 is
    ``(v − 1)/h`` with ``h`` the band's half-width (±1 at the band edges): the same information,
    scaled so that a network sees the 5 % band as O(1) (``observed_voltages()`` gives p.u.).

Actions (float32 Box [-1, 1], shape (1,) or (2,) with ``curtail``)
    ``a[0]`` scales the reactive power available after active power:
    ``q = a[0] · sqrt(S² − p²)`` (MVar, positive = injection, raises the voltage), where
    ``S = inverter_oversize · P_rated`` (default 1.1, so at full sun 0.46·P_rated of reactive
    power stays available, above IEEE 1547's 0.44). With ``curtail``, ``a[1]`` > 0 sheds that
    share of the available PV power (``a[1]`` ≤ 0: none); curtailment is applied before ``q``'s
    limit is computed. Values outside [-1, 1] are clipped, NaN counts as 0; nothing is rejected.
    ``action=residual``: ``a[0]`` is a correction to the local IEEE 1547 volt-var set-point
    computed from the agent's observed voltage: ``q/q_avail = clip(vv + residual_scale·s(a[0]))``
    with ``s`` zero for ``|a| ≤ residual_deadband`` and linear to ±1 beyond, so a zero (or small)
    action is exactly volt-var. Baseline controllers call ``encode_actions`` and act the same in
    both modes.

Reward
    ``reward="shared"`` (default): every agent gets ``−mean_b β(v_b) − q_weight·mean_i |q_i|/S_i
    − curtail_weight·mean_i c_i/S_i`` over all buses ``b`` and agents ``i``; ``"local"``: each
    agent gets ``−β(v)`` at its own bus minus its own costs. The barrier β is a continuous bowl
    in the percentage deviation ``d = 100·|v − 1|`` with ``h = 100·(v_max − 1)`` the band's
    half-width (5 %): ``β = b·(d/h)²`` inside the band and ``b + (d − h)`` outside, with
    ``b = barrier_inside`` (0.1) — gentle inside, steep outside (the same shape as MAPDN's
    "bowl", Wang et al. 2021, §4). ``loss_weight`` adds ``− loss_weight·losses/ΣS`` (feeder losses
    in MW over the agents' total rating) to every agent's reward. A power flow
    that does not converge gives every agent ``−nonconverged_penalty`` (200, as MAPDN) and ends
    the episode (termination); ``infos[agent]["nonconverged"]`` is True then.

State (``state()``, ``state_space``)
    Every bus voltage (p.u., clipped to [0, 2]), then the net active and reactive injection
    per bus (MW, Mvar; bounded by the feeder's total load and inverter ratings), then sin/cos
    of the time of day: ``3·n_bus + 2`` float32 values.

Rendering
    None (``render_mode`` must be None; ``render()`` warns and returns None).

KPIs (episode_kpis)
    ``controllable_rate`` (main, max): share of the episode's ``horizon`` steps with every bus
    within [v_min, v_max] (steps lost to a power flow that did not converge count as outside); ``voltage_violation`` (min): Σ over
    steps and buses of the p.u. distance outside the band; ``losses_mwh``, ``curtailed_mwh``,
    ``reactive_mvarh`` (Σ|q|·0.25 h), ``nonconverged`` (count), ``v_max``/``v_min`` seen.

Episode end
    After ``horizon`` steps (default 96 = one day; truncation), or at a power flow that does not
    converge (termination). An episode starts at 00:00 of a day drawn with the env's seeded
    generator from the days of ``split`` (and ``season``), or of the fixed ``day``.
    Days 0..365 of the profile year (2016, 366 days); ``horizon`` > 96 needs ``split=all``, so an
    episode never leaves its day and training never steps through a held-out interval. ``split="eval"`` uses the held-out days
    ``d % holdout_every == holdout_every − 1`` (every 5th day: 4, 9, 14, ...); ``"train"`` the
    rest; ``"all"`` every day. An episode longer than the days left in the year is cut short.
    ``reset(options={"day": d})`` forces a day (it must belong to the split).

Arguments (``--set key=value``; types, defaults and help in :class:`GridConfig`)
    ``feeder`` (any SimBench MV or LV code, e.g. ``1-MV-semiurb--0-sw`` or ``1-LV-urban6--0-sw``,
    or ``ieee33``; an unknown name lists them all), ``pv_scale`` (PV penetration: factor on the agents'
    ratings and output), ``load_scale``, ``inverter_oversize``, ``curtail``, ``horizon``,
    ``split`` (train|eval|all), ``season`` (all|summer|winter), ``day``, ``holdout_every``,
    ``v_min``/``v_max``, ``reward`` (shared|local), ``q_weight``, ``curtail_weight``,
    ``barrier_inside``, ``loss_weight``, ``action`` (absolute|residual), ``residual_scale``,
    ``residual_deadband``, ``v_obs`` (pu|deviation), ``nonconverged_penalty``, ``hops`` (topology: agents within k feeder hops are linked, edge
    attribute ``distance`` = Σ|z| in p.u. along the feeder path, ``hops``), ``max_iter``,
    ``solver`` (lightsim2grid | pandapower — the runpp reference, ~100x slower).

Version history
    v0 (issue 7): first version.
    v1 (issue 15): ``action=residual``, ``residual_*``, ``v_obs``, ``barrier_inside``, ``loss_weight``;
    defaults unchanged (grid/ieee33's preset selects the residual interface).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Literal

import networkx as nx
import numpy as np
from gymnasium import spaces

from marl.core.errors import ConfigError
from scenarios.base import Scenario
from scenarios.grid.feeder import STEPS_PER_DAY, Feeder, PandapowerFlow, PowerFlow, bus_agent_graph, load_feeder

__all__ = ["FeederDays", "GridConfig", "GridVoltageEnv", "barrier", "SUMMER_DAYS", "days_of"]

#: Days of the 2016 profile year from 1 June to 31 August (0-based, leap year).
SUMMER_DAYS = range(152, 244)
#: Days of the profile year from 1 December to the end of February.
WINTER_DAYS = tuple(range(60)) + tuple(range(335, 366))
HOURS_PER_STEP = 0.25


@dataclass
class FeederDays:
    """What the grid scenarios share: which days of the profile year episodes play (held-out days
    for evaluation), how long an episode is, and the voltage band that KPIs judge."""

    horizon: int = field(default=96, metadata={"help": "steps of 15 min per episode"})
    split: Literal["train", "eval", "all"] = field(default="train", metadata={"help": "which days episodes start on"})
    season: Literal["all", "summer", "winter"] = field(
        default="all", metadata={"help": "restrict days to Jun-Aug or Dec-Feb"}
    )
    day: int = field(default=-1, metadata={"help": "fixed start day 0..365 (-1: drawn from the seed)"})
    holdout_every: int = field(default=5, metadata={"help": "every n-th day is held out for evaluation"})
    v_min: float = field(default=0.95, metadata={"help": "lower voltage limit, p.u."})
    v_max: float = field(default=1.05, metadata={"help": "upper voltage limit, p.u."})

    def __post_init__(self) -> None:
        for name in ("horizon", "holdout_every"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"bad value for {name}: {getattr(self, name)}; expected > 0")
        if not 0 < self.v_min < 1 < self.v_max:
            raise ConfigError(f"bad voltage band [{self.v_min}, {self.v_max}]; expected v_min < 1 < v_max")
        if self.holdout_every < 2 and self.split != "all":
            raise ConfigError(f"bad value for holdout_every: {self.holdout_every}; expected >= 2")
        if self.horizon > STEPS_PER_DAY and self.split != "all":
            # a longer episode would run into the next day, which may belong to the other split
            raise ConfigError(f"bad value for horizon: {self.horizon}; expected <= {STEPS_PER_DAY} unless split=all")
        if not -1 <= self.day <= 365:
            raise ConfigError(f"bad value for day: {self.day}; expected -1 or 0..365")


@dataclass
class GridConfig(FeederDays):
    feeder: str = field(
        default="1-MV-rural--0-sw",
        metadata={"help": "any SimBench MV or LV code (1-MV-semiurb--0-sw, ...) or 'ieee33'"},
    )
    pv_scale: float = field(default=1.0, metadata={"help": "PV penetration: factor on every agent's rating and output"})
    load_scale: float = field(default=1.0, metadata={"help": "factor on every load"})
    inverter_oversize: float = field(default=1.1, metadata={"help": "inverter rating S / PV rated power"})
    curtail: bool = field(default=False, metadata={"help": "agents may also curtail active power (2nd action)"})
    reward: Literal["shared", "local"] = field(default="shared", metadata={"help": "shared or local reward"})
    q_weight: float = field(default=0.1, metadata={"help": "cost per |q|/S"})
    curtail_weight: float = field(default=0.5, metadata={"help": "cost per curtailed p/S"})
    barrier_inside: float = field(
        default=0.1, metadata={"help": "barrier value at the band edge (bowl inside the band); 0: flat in band"}
    )
    loss_weight: float = field(default=0.0, metadata={"help": "cost per MW of feeder losses / total inverter rating"})
    action: Literal["absolute", "residual"] = field(
        default="absolute", metadata={"help": "a[0] is q/q_avail, or a correction added to local volt-var's"}
    )
    v_obs: Literal["pu", "deviation"] = field(
        default="pu", metadata={"help": "observed voltage: p.u., or (v - 1) / half-band (±1 at the band edges)"}
    )
    residual_scale: float = field(default=1.0, metadata={"help": "residual mode: q/q_avail = volt-var + scale*a[0]"})
    residual_deadband: float = field(
        default=0.0, metadata={"help": "residual mode: |a[0]| below this is no correction (then linear to ±scale)"}
    )
    nonconverged_penalty: float = field(default=200.0, metadata={"help": "reward when the power flow fails"})
    hops: int = field(default=3, metadata={"help": "agents within this many feeder hops are linked"})
    max_iter: int = field(default=20, metadata={"help": "Newton-Raphson iterations per solve"})
    solver: Literal["lightsim2grid", "pandapower"] = field(
        default="lightsim2grid",
        metadata={"help": "power-flow engine; pandapower (runpp) is the ~100x slower reference"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()

        def positive(name: str) -> None:
            if not getattr(self, name) > 0:
                raise ConfigError(f"bad value for {name}: {getattr(self, name)}; expected > 0")

        for name in (
            "pv_scale",
            "load_scale",
            "max_iter",
            "nonconverged_penalty",
            "residual_scale",
        ):
            positive(name)
        for name in ("barrier_inside", "loss_weight", "q_weight", "curtail_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"bad value for {name}: {getattr(self, name)}; expected >= 0")
        if self.inverter_oversize < 1.0:
            raise ConfigError(f"bad value for inverter_oversize: {self.inverter_oversize}; expected >= 1")
        if not 0 <= self.residual_deadband < 1:
            raise ConfigError(f"bad value for residual_deadband: {self.residual_deadband}; expected 0 <= x < 1")
        if self.hops < 0:
            raise ConfigError(f"bad value for hops: {self.hops}; expected >= 0")


def days_of(config: FeederDays, n_days: int = 366) -> np.ndarray:
    """The days an episode may start on under ``config`` (split, season), ascending."""
    days = np.arange(n_days)
    held_out = days % config.holdout_every == config.holdout_every - 1
    if config.split == "train":
        days = days[~held_out]
    elif config.split == "eval":
        days = days[held_out]
    if config.season == "summer":
        days = days[np.isin(days, SUMMER_DAYS)]
    elif config.season == "winter":
        days = days[np.isin(days, WINTER_DAYS)]
    return days


def barrier(v: np.ndarray, v_min: float, v_max: float, inside: float = 0.1) -> np.ndarray:
    """The voltage bowl β(v) of the env card (0 at 1 p.u., ``inside`` at the band edge, slope 1 per % outside)."""
    d = 100.0 * np.abs(v - 1.0)
    h = np.where(v >= 1.0, 100.0 * (v_max - 1.0), 100.0 * (1.0 - v_min))
    return np.where(d <= h, inside * (d / h) ** 2, inside + (d - h))


@functools.lru_cache(maxsize=8)
def _agent_graph(feeder_name: str, hops: int) -> nx.Graph:
    """Agents linked when their buses are within ``hops`` branches; ``distance``: Σ|z| in p.u."""
    feeder = load_feeder(feeder_name)
    buses = feeder.sgen_bus[feeder.agent_sgens]
    return bus_agent_graph(feeder, buses, [f"pv_{i}" for i in range(len(buses))], hops)


class GridVoltageEnv(Scenario):
    """PV inverters controlling feeder voltages; see the module docstring (env card)."""

    Config = GridConfig
    main_kpi = "controllable_rate"
    kpi_goals = {
        "controllable_rate": "max",
        "voltage_violation": "min",
        "losses_mwh": "min",
        "curtailed_mwh": "min",
        "reactive_mvarh": "min",
        "nonconverged": "min",
    }
    metadata = {"name": "grid_voltage_v0", "render_modes": [], "is_parallelizable": True}

    def __init__(self, config: GridConfig | None = None, render_mode: str | None = None) -> None:
        self.config = config = config if config is not None else GridConfig()
        self._set_render_mode(render_mode)
        self.feeder: Feeder = load_feeder(config.feeder)
        f = self.feeder
        self.days = days_of(config, f.n_steps // STEPS_PER_DAY)
        if len(self.days) == 0:
            raise ConfigError(f"no day left for split={config.split} season={config.season}")
        if config.day >= 0 and config.day not in self.days:
            raise ConfigError(
                f"bad value for day: {config.day} is not a {config.split} day "
                f"(held out: d % {config.holdout_every} == {config.holdout_every - 1})"
            )
        self.pf = (PowerFlow if config.solver == "lightsim2grid" else PandapowerFlow)(f, max_iter=config.max_iter)
        self.agent_sgens = f.agent_sgens
        self.agent_bus = f.sgen_bus[f.agent_sgens]
        n = len(self.agent_sgens)
        self.possible_agents = [f"pv_{i}" for i in range(n)]
        self.agents: list[str] = []
        #: inverter rating S per agent, MVA
        self.agent_s_mva = f.sgen_sn[f.agent_sgens] * config.pv_scale * config.inverter_oversize
        self._pv_factor = np.ones(len(f.sgen_bus))
        self._pv_factor[f.agent_sgens] = config.pv_scale
        self._act_dim = 2 if config.curtail else 1
        self._half_band = 0.5 * (config.v_max - config.v_min)
        self._obs_dim = 6 + self._act_dim
        low = np.array([0.0, -50, -50, 0, -1, -1] + [-1.0] * self._act_dim, dtype=np.float32)
        high = np.array([2.0, 50, 50, 50, 1, 1] + [1.0] * self._act_dim, dtype=np.float32)
        if config.v_obs == "deviation":  # (v - 1) / half-band, over the same 0..2 p.u. range
            low[0], high[0] = -1.0 / self._half_band, 1.0 / self._half_band
        self._obs_low, self._obs_high = low, high
        self._obs_space = spaces.Box(low, high, dtype=np.float32)
        self._act_space = spaces.Box(-1.0, 1.0, shape=(self._act_dim,), dtype=np.float32)
        self._rng = np.random.default_rng()
        self._n_bus = f.n_bus
        # state_space bound: the largest net injection any bus can see (MW or Mvar) is all the
        # feeder's peak load plus all its generation at full rating (inverters: S), plus a margin.
        rating = np.maximum(f.sgen_sn, f.sgen_p.max(axis=0)) * self._pv_factor
        rating[f.agent_sgens] *= config.inverter_oversize
        peak_load = np.abs(f.load_p).max(axis=0).sum() + np.abs(f.load_q).max(axis=0).sum()
        bound = float(config.load_scale * peak_load + rating.sum()) + 1.0
        self._state_bound = bound
        n_bus = f.n_bus
        self.state_space = spaces.Box(
            np.concatenate([np.zeros(n_bus), np.full(2 * n_bus, -bound), [-1.0, -1.0]]).astype(np.float32),
            np.concatenate([np.full(n_bus, 2.0), np.full(2 * n_bus, bound), [1.0, 1.0]]).astype(np.float32),
            dtype=np.float32,
        )
        self._start = 0
        self._k = 0
        self._steps = 0
        self._last_action = np.zeros((n, self._act_dim))
        self._q = np.zeros(n)
        self._p = np.zeros(n)
        zeros_l, zeros_s = np.zeros(len(f.load_bus)), np.zeros(len(f.sgen_bus))
        self._inj: tuple[np.ndarray, ...] = (zeros_l, zeros_l, zeros_s, zeros_s)  # of the last solve
        self.day = -1
        self._horizon = config.horizon
        #: bus voltages (p.u.) right after the last step's set-points were applied
        self.step_voltages = np.ones(f.n_bus)
        self._v_obs = np.ones(n, dtype=np.float32)  #: each agent's voltage as last observed
        self._reset_kpis()

    # ------------------------------------------------------------------ spaces
    def observation_space(self, agent: str) -> spaces.Box:
        return self._obs_space

    def action_space(self, agent: str) -> spaces.Box:
        return self._act_space

    # ------------------------------------------------------------------ helpers used by controllers
    @property
    def t(self) -> int:
        """Index of the current 15-min interval in the profile year."""
        return self._start + self._k

    def injections(self, t: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(load p MW, load q Mvar, sgen available p MW) of interval ``t`` (default: current)."""
        t = self.t if t is None else t
        f, c = self.feeder, self.config
        return f.load_p[t] * c.load_scale, f.load_q[t] * c.load_scale, f.sgen_p[t] * self._pv_factor

    def pv_available(self) -> np.ndarray:
        """Available PV active power of each agent in the current interval, MW."""
        return self.feeder.sgen_p[self.t, self.agent_sgens] * self.config.pv_scale

    def bus_voltages(self) -> np.ndarray:
        """Voltage magnitude of every bus (p.u.) at the last converged solve."""
        return self.pf.vm.copy()

    def actions_to_setpoints(self, actions: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Clipped action matrix, PV active power (MW) and reactive power (Mvar) per agent."""
        try:  # fast path: one action per possible agent, each of the right size
            a = np.array([actions[ag] for ag in self.possible_agents], dtype=np.float64)
            if a.ndim == 1:
                a = a[:, None]
            if a.shape != (len(self.possible_agents), self._act_dim):
                raise ValueError
        except (KeyError, ValueError, TypeError):
            a = np.zeros((len(self.possible_agents), self._act_dim))
            for i, agent in enumerate(self.possible_agents):
                if agent in actions:
                    a[i] = np.asarray(actions[agent], dtype=np.float64).reshape(-1)[: self._act_dim]
        a[np.isnan(a)] = 0.0
        a = np.clip(a, -1.0, 1.0)
        p_avail = self.pv_available()
        p = p_avail * (1.0 - np.maximum(a[:, 1], 0.0)) if self._act_dim == 2 else p_avail
        q_avail = np.sqrt(np.maximum(self.agent_s_mva**2 - p**2, 0.0))
        if self.config.action == "residual":
            c = self.config
            shrunk = (
                np.sign(a[:, 0]) * np.maximum(np.abs(a[:, 0]) - c.residual_deadband, 0.0) / (1.0 - c.residual_deadband)
            )
            a[:, 0] = np.clip(self.volt_var_share(q_avail) + c.residual_scale * shrunk, -1.0, 1.0)
        return a, p, a[:, 0] * q_avail

    def observed_voltages(self) -> np.ndarray:
        """Each agent's bus voltage (p.u., float32) as in its last observation (whatever ``v_obs``)."""
        return self._v_obs.copy()

    def volt_var_share(self, q_avail: np.ndarray) -> np.ndarray:
        """Local IEEE 1547 Cat. B volt-var reactive power as a share of ``q_avail``, from each
        agent's observed voltage (the residual mode's base; equals the ``volt-var`` controller)."""
        from scenarios.grid.controllers import volt_var_curve

        q = volt_var_curve(self._v_obs.astype(np.float64)) * self.agent_s_mva
        return np.clip(np.divide(q, q_avail, out=np.zeros_like(q), where=q_avail > 0), -1.0, 1.0)

    def encode_actions(self, a: np.ndarray) -> np.ndarray:
        """Actions ``[N, dim]`` giving the absolute set-points ``a`` (a[:, 0] = q/q_avail) in this
        env's action mode; baselines call this so they act the same in either mode."""
        a = np.array(a, dtype=np.float64, copy=True)
        if self.config.action == "residual":
            p_avail = self.pv_available()
            p = p_avail * (1.0 - np.maximum(a[:, 1], 0.0)) if self._act_dim == 2 else p_avail
            q_avail = np.sqrt(np.maximum(self.agent_s_mva**2 - p**2, 0.0))
            c = self.config
            x = (a[:, 0] - self.volt_var_share(q_avail)) / c.residual_scale
            a[:, 0] = np.where(
                x == 0, 0.0, np.sign(x) * (c.residual_deadband + (1.0 - c.residual_deadband) * np.abs(x))
            )
        return np.clip(a, -1.0, 1.0).astype(np.float32)

    # ------------------------------------------------------------------ PettingZoo API
    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        day = (options or {}).get("day")
        if day is None:
            day = self.config.day if self.config.day >= 0 else int(self._rng.choice(self.days))
        elif int(day) not in self.days:
            raise ConfigError(
                f"bad reset day {day}: not a day of split={self.config.split} season={self.config.season}"
            )
        self.day = int(day)
        self._start = self.day * STEPS_PER_DAY
        self._horizon = min(self.config.horizon, self.feeder.n_steps - self._start)
        self._k = 0
        self._steps = 0
        self.agents = list(self.possible_agents)
        self._last_action[:] = 0.0
        self._p = self.pv_available()
        self._q = np.zeros(len(self.possible_agents))
        self._reset_kpis()
        self.pf.reset()
        ok = self._measure()  # if even this fails, the first step fails too and ends the episode
        infos = {a: {"day": self.day, "nonconverged": not ok} for a in self.agents}
        return self._observations(), infos

    def step(self, actions: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        if not self.agents:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        c = self.config
        a, p, q = self.actions_to_setpoints(actions)
        self._last_action = a
        converged = self._solve(p, q)
        self._steps += 1
        self._p, self._q = p, q
        agents = list(self.agents)
        if not converged:
            self._kpi["nonconverged"] += 1
            rewards = dict.fromkeys(agents, -c.nonconverged_penalty)
            terms = dict.fromkeys(agents, True)
            truncs = dict.fromkeys(agents, False)
            infos = {ag: {"nonconverged": True, "day": self.day} for ag in agents}
            obs = self._observations()
            self.agents = []
            return obs, rewards, terms, truncs, infos

        v = self.pf.vm
        self.step_voltages = v.copy()
        p_avail = self.pv_available()
        losses, _ = self.pf.injected_p()
        over = np.maximum(v - c.v_max, 0.0) + np.maximum(c.v_min - v, 0.0)
        k = self._kpi
        k["in_band_steps"] += float(not over.any())
        k["voltage_violation"] += float(over.sum())
        k["losses_mwh"] += losses * HOURS_PER_STEP
        k["curtailed_mwh"] += float((p_avail - p).sum()) * HOURS_PER_STEP
        k["reactive_mvarh"] += float(np.abs(q).sum()) * HOURS_PER_STEP
        k["v_max"] = max(k["v_max"], float(v.max()))
        k["v_min"] = min(k["v_min"], float(v.min()))

        s = self.agent_s_mva
        q_cost = c.q_weight * np.abs(q) / s
        cut_cost = c.curtail_weight * (p_avail - p) / s
        loss_cost = c.loss_weight * losses / float(s.sum())
        beta = barrier(v, c.v_min, c.v_max, c.barrier_inside)
        if c.reward == "shared":
            n = len(agents)
            r = -float(beta.sum()) / len(beta) - float(q_cost.sum() + cut_cost.sum()) / n - loss_cost
            rewards = dict.fromkeys(agents, r)
        else:
            local = -beta[self.agent_bus] - q_cost - cut_cost - loss_cost
            rewards = dict(zip(self.possible_agents, local.tolist()))

        self._k += 1
        done = self._k >= self._horizon
        terms = dict.fromkeys(agents, False)
        truncs = dict.fromkeys(agents, done)
        infos = {ag: {"nonconverged": False, "day": self.day} for ag in agents}
        if done:
            self.agents = []
            obs = self._observations()
        else:
            if not self._measure():  # the next interval with set-points held fails to solve
                self._kpi["nonconverged"] += 1
                for ag in agents:
                    rewards[ag] = -c.nonconverged_penalty
                    terms[ag], truncs[ag] = True, False
                    infos[ag]["nonconverged"] = True
                self.agents = []
            obs = self._observations()
        return obs, rewards, terms, truncs, infos

    def _solve(self, p: np.ndarray, q: np.ndarray) -> bool:
        load_p, load_q, sgen_p = self.injections()
        sgen_p = sgen_p.copy()
        sgen_p[self.agent_sgens] = p
        sgen_q = np.zeros_like(sgen_p)
        sgen_q[self.agent_sgens] = q
        self._inj = (load_p, load_q, sgen_p, sgen_q)
        return self.pf.solve(load_p, load_q, sgen_p, sgen_q)

    def _measure(self) -> bool:
        """Solve the current interval with the previous set-points held (what inverters measure).

        The held reactive power is re-limited to what the new PV output allows.
        """
        p_avail = self.pv_available()
        if self._act_dim == 2:
            p = p_avail * (1.0 - np.maximum(self._last_action[:, 1], 0.0))
        else:
            p = p_avail
        q_avail = np.sqrt(np.maximum(self.agent_s_mva**2 - p**2, 0.0))
        ok = self._solve(p, self._last_action[:, 0] * q_avail)
        return ok

    def _observations(self) -> dict[str, np.ndarray]:
        f = self.feeder
        t = min(self.t, f.n_steps - 1)
        load_p = f.load_p[t] * self.config.load_scale
        load_q = f.load_q[t] * self.config.load_scale
        bus_p = np.bincount(f.load_bus, load_p, minlength=self._n_bus)[self.agent_bus]
        bus_q = np.bincount(f.load_bus, load_q, minlength=self._n_bus)[self.agent_bus]
        s = self.agent_s_mva
        tod = 2 * np.pi * (t % STEPS_PER_DAY) / STEPS_PER_DAY
        n = len(self.possible_agents)
        obs = np.empty((n, self._obs_dim), dtype=np.float64)
        obs[:, 0] = self.pf.vm[self.agent_bus]
        obs[:, 1] = bus_p / s
        obs[:, 2] = bus_q / s
        obs[:, 3] = f.sgen_p[t, self.agent_sgens] * self.config.pv_scale / s
        obs[:, 4] = np.sin(tod)
        obs[:, 5] = np.cos(tod)
        obs[:, 6:] = self._last_action
        obs[:, 0] = np.clip(obs[:, 0], 0.0, 2.0)
        self._v_obs = obs[:, 0].astype(np.float32)  # what volt-var reads, in p.u.
        if self.config.v_obs == "deviation":
            obs[:, 0] = (obs[:, 0] - 1.0) / self._half_band
        obs = np.clip(obs, self._obs_low, self._obs_high).astype(np.float32)
        return dict(zip(self.possible_agents, obs))

    # ------------------------------------------------------------------ Concord extras
    def state(self) -> np.ndarray:
        """All bus voltages (p.u.), then net active and reactive injection per bus (MW, Mvar),
        then sin/cos of the time of day; float32 of length 3·n_bus + 2."""
        f = self.feeder
        load_p, load_q, sgen_p, sgen_q = self._inj
        p = np.bincount(f.sgen_bus, sgen_p, minlength=self._n_bus) - np.bincount(
            f.load_bus, load_p, minlength=self._n_bus
        )
        q = np.bincount(f.sgen_bus, sgen_q, minlength=self._n_bus) - np.bincount(
            f.load_bus, load_q, minlength=self._n_bus
        )
        tod = 2 * np.pi * (self.t % STEPS_PER_DAY) / STEPS_PER_DAY
        b = self._state_bound
        vm = np.clip(self.pf.vm, 0.0, 2.0)
        return np.concatenate([vm, np.clip(p, -b, b), np.clip(q, -b, b), [np.sin(tod), np.cos(tod)]]).astype(np.float32)

    @property
    def topology(self) -> nx.Graph:
        return _agent_graph(self.config.feeder, self.config.hops)

    def _reset_kpis(self) -> None:
        self._kpi = {
            "in_band_steps": 0.0,
            "voltage_violation": 0.0,
            "losses_mwh": 0.0,
            "curtailed_mwh": 0.0,
            "reactive_mvarh": 0.0,
            "nonconverged": 0.0,
            "v_max": 0.0,
            "v_min": 2.0,
        }

    def episode_kpis(self) -> dict[str, float]:
        k = dict(self._kpi)
        # over the planned horizon: steps lost to a failed power flow count as out of band
        out = {"controllable_rate": k.pop("in_band_steps") / max(self._horizon, 1), **k}
        if self._steps == 0 or out["v_max"] == 0.0:
            out["v_max"], out["v_min"] = float(self.pf.vm.max()), float(self.pf.vm.min())
        out["day"] = float(self.day)
        return {key: float(v) for key, v in out.items()}

    def close(self) -> None:
        self.agents = []
