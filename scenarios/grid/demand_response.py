"""Env card: demand response — household batteries that shave a low-voltage feeder's peak.

Description
    Every household of a SimBench low-voltage feeder (Meinecke et al., Energies 2020) has a
    battery; some also have rooftop PV. Every 15 minutes each household sets its battery's
    charge or discharge power. Together they should flatten what the feeder draws through its
    MV/LV transformer — lower peak, less ramping, a higher load factor — at low electricity cost,
    with voltages and the transformer kept within limits. No household sees the feeder's total:
    that is what the ``consensus`` controller agrees on over the channel
    (``scenarios/grid/dr_controllers.py``). The AC power flow is solved every step by
    lightsim2grid (the voltage scenarios' :class:`~scenarios.grid.feeder.PowerFlow`: model built
    once, warm-started), so feeder import, losses, transformer loading and bus voltages are
    physical. KPIs follow CityLearn (Vazquez-Canteli et al. 2020; Nweye et al. 2023).

Agents
    ``house_<i>``, one per load of the feeder in SimBench's load order (``sim_ids`` gives the
    SimBench load name, ``house_bus`` the bus). 1-LV-semiurb4 (default): 41 households on 44
    buses behind one 0.4 MVA transformer. The feeder's own PV units (static generators) belong
    to the household at the same bus (else the nearest one) and count in its net load.

Household model (units: kW, kWh; ``Δt`` = 0.25 h)
    ``load`` is the SimBench profile of the load times ``load_scale``; ``pv`` is the household's
    share of the feeder's PV units plus, for every household picked by ``pv_share`` (evenly
    spread over the load order: household ``i`` has PV when ``floor((i+1)·s) > floor(i·s)``),
    ``pv_kwp`` kWp of rooftop PV with SimBench's ``PV*`` feed-in profiles of the feeder (round
    robin). Battery: ``battery_kwh`` capacity, ``battery_kw`` power (both directions), one-way
    efficiency ``efficiency`` (charge and discharge; round trip ``efficiency²``), state of
    charge ``soc`` kept in [``soc_min``, 1], starting every episode at ``soc_init``.
    Net load ``net = load − pv + b`` with ``b`` the battery's power (charging positive).

Observation (float32 Box, 10 values; 12 with ``forecast``), per agent, for the interval about to
    be played: ``[(load − pv)/P, load/P, pv/P, soc, sin(tod), cos(tod), price/price_peak, dv,
    b_last/P, steps_left/horizon]`` with ``P = battery_kw``, ``tod = 2π·k/96``, ``dv = (v − 1)/0.05``
    the household's bus voltage after the previous step (at reset: the first interval with
    batteries idle), ``b_last`` the battery power applied in the previous step. Clipped to the
    space's bounds ([-20, 20] for the power ratios, [-4, 4] for ``dv``). ``forecast=mean`` adds
    the household's own PV surplus ``Σ max(pv − load, 0)·Δt`` and deficit ``Σ max(load − pv, 0)·Δt``
    from this interval to the end of the day, over ``battery_kwh`` (clipped to [0, 20]), as the mean
    of its meter's last ``lag_days`` days (a forecast any household can make; ``perfect``: this day
    exactly, the information the LP and the default consensus controller have). The day-ahead
    outlook tells a learner whether a night charge will be crowded out by PV later.

Actions (float32 Box [-1, 1], shape (1,))
    Battery power as a share of ``battery_kw``: +1 charges at full power, −1 discharges at full
    power. The env limits it to what the state of charge allows in the interval (charge:
    ``(1 − soc)·E/(η·Δt)``; discharge: ``(soc − soc_min)·E·η/Δt``); NaN counts as 0, values
    outside [-1, 1] are clipped, nothing is rejected. A discharge larger than the household's
    load is exported; with ``battery_export=false`` the discharge is limited to the household's own
    net load ``max(load − pv, 0)`` (a home battery in self-consumption mode: it never feeds the
    grid, so it never sells stored energy at ``feed_in``).

    ``action=residual`` (registered for ``grid/demand-response``): ``a[0]`` is a correction to what the ``local-rule`` controller would do
    in this interval (its default hours): battery share ``= clip(base + residual_scale·a[0], −1, 1)``
    with ``base`` the local rule's share (:meth:`DemandResponseEnv.local_rule_kw`, within the
    battery's limits), then limited as above. A zero action plays the local rule exactly, so a
    zero-mean policy starts there. With the default ``residual_scale`` 2 every share in [-1, 1] is
    reachable from every base, so :meth:`~DemandResponseEnv.encode_actions` turns any baseline's
    shares into the residual actions that play them: the baselines' actions and KPIs are the same
    in both modes.

Reward
    ``reward="shared"`` (the config's default; ``grid/demand-response`` registers ``share``), every agent: ``− peak_weight·(import/P_ref)² −
    cost_weight·bill/(N·P·Δt·price_peak)``; ``import`` is the feeder's active power drawn at
    the slack bus (kW, losses included, negative when it exports), ``P_ref`` (``p_ref``) the mean
    over the profile year of Σ household net load without batteries (the feeder's mean import
    less losses), ``bill`` the households' total bill for the interval (below). ``"local"``:
    each agent the same terms for its own household (``net_i`` over the year's mean of its
    own ``|load − pv|``, its own bill over ``P·Δt·price_peak``). ``"share"``: each household
    pays for its share of the feeder's deviation from the day's mean and its own bill:
    ``− peak_weight·N·net_i·(import − m)/P_ref² − cost_weight·bill_i/(P·Δt·price_peak)`` with ``m``
    the day's mean of Σ household net load without batteries (known to the env at reset, not to
    the agents). ``N·(import − m)/P_ref²`` is the marginal cost of the household's kW to
    ``Σ_t (import − m)²`` — a price that is positive above the day's mean and negative below
    it, so a household gains by moving energy from the feeder's peak to its valley, not only
    from its own. At the last step each household also gets ``+ peak_weight·N·S_i·(m − M)/P_ref²``
    with ``S_i = Σ_t net_i`` and ``M`` the day's realised mean import, which re-centres its
    terms on ``M``: over the day the households' terms add up to ``−N·Σ_t Σ_i net_i·(import − M)
    /P_ref²``, about ``−N·Σ_t (import − M)²/P_ref²`` (Σ net_i is the import less losses): the
    import's spread about its own mean, which a constant shift (energy stored or drawn evenly
    over the day) does not change; filling valleys and shaving peaks does.
    At its last step ``share`` also charges every household the energy
    missing from its battery at ``price_offpeak/efficiency`` (as ``cost_eur`` does; a fuller
    battery earns it back), so its cost terms add up to its part of ``cost_eur``.
    At the last step every agent also gets ``− soc_weight·|soc_end − soc_init|`` (mean over
    households for ``shared``, its own for ``local`` and ``share``), so that emptying the battery
    is not free; ``soc_above`` (0..1, default 1) scales the term for a battery that ends above its
    start (``soc_above`` < 1: ending below costs more than ending the same amount above).

Prices (time of use, €/kWh)
    ``price_offpeak`` from 22:00 to 07:00, ``price_peak`` from 17:00 to 21:00, ``price_day`` in
    between; exports are paid ``feed_in``. Bill of household ``i`` in an interval:
    ``(price·max(net_i, 0) − feed_in·max(−net_i, 0))·Δt``.

State (``state()``, ``state_space``)
    Bus voltages (p.u., clipped to [0, 2]), every household's soc and ``(load − pv)/P``
    (clipped to ±20), the feeder import over ``P_ref`` (clipped to ±50), sin/cos of the time of
    day and ``price/price_peak``: ``n_bus + 2·N + 4`` float32 values.

Rendering
    None (``render_mode`` must be None; ``render()`` warns and returns None).

KPIs (episode_kpis), CityLearn's names where they exist
    ``peak_kw`` (main, min): the largest feeder import of the episode (kW; CityLearn's peak
    demand, here per day); ``cost_eur``: the households' bills plus the energy missing from the
    batteries at the end valued at ``price_offpeak/efficiency`` (a battery left fuller earns that
    much back), so no controller profits from emptying them; ``ramping_kw``: Σ|import_t −
    import_{t−1}|; ``one_minus_load_factor``: 1 − mean(import)/max(import); ``import_kwh``,
    ``export_kwh`` (feeder level); ``losses_kwh``; ``voltage_violation`` (Σ over steps and
    buses of the p.u. distance outside [``v_min``, ``v_max``]) and ``violation_steps``;
    ``overload_steps`` (steps with transformer loading above 100 %: |S| at the slack bus over
    the transformers' rating) and ``max_loading`` (share of rating); ``throughput_kwh``
    (Σ|b|·Δt over households: the degradation proxy); ``soc_change_kwh`` (stored energy at the
    end minus at the start, all households); ``nonconverged`` (power flows that failed; the
    previous solution is kept); ``day``.

Episode end
    After ``horizon`` steps (default 96: one day, truncation). An episode starts at 00:00 of a
    day drawn with the env's seeded generator from the days of ``split`` and ``season`` (the
    voltage scenarios' rule, :func:`scenarios.grid.env.days_of`): ``eval`` is every
    ``holdout_every``-th day (4, 9, 14, ...), ``train`` the rest, ``all`` every day; or the fixed
    ``day``; ``reset(options={"day": d})`` forces one (it must belong to the split).
    ``day_end="termination"`` reports the last step as a termination instead: the day is settled
    (buy-back, soc term) and nothing follows, so a learner does not bootstrap a value past it.

Arguments (``--set key=value``; types, defaults and help in :class:`DRConfig`)
    ``feeder`` (a SimBench LV code), ``load_scale``, ``pv_share``, ``pv_kwp``, ``battery_kwh``,
    ``battery_kw``, ``efficiency``, ``soc_init``, ``soc_min``, ``price_offpeak``, ``price_day``,
    ``price_peak``, ``feed_in``, ``horizon``, ``split``, ``season``, ``day``, ``holdout_every``,
    ``v_min``/``v_max``, ``reward`` (shared|local|share), ``peak_weight``, ``cost_weight``,
    ``soc_weight``, ``soc_above``, ``battery_export``, ``forecast`` (none|mean|perfect), ``lag_days``,
    ``day_end`` (truncation|termination), ``action`` (absolute|residual), ``residual_scale``, ``hops``
    (topology: households within ``hops`` feeder branches are linked; edge ``distance`` = Σ|z|
    in p.u. along the feeder), ``max_iter``, ``solver`` (lightsim2grid | pandapower, the runpp
    reference for ``marl bench grid``).

Version history
    v0 (issue 18): first version.
    v1: ``action=residual`` with ``residual_scale``, ``reward=share``; defaults unchanged (the
    ``grid/demand-response`` registration selects residual actions and the share reward, the
    learned agents' interface; the baselines play the same actions in both modes).
    v2: ``soc_above``, ``battery_export``, ``forecast``/``lag_days`` (two more observation values),
    ``day_end``; every default keeps v1's behaviour.
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
from scenarios.grid.env import HOURS_PER_STEP, FeederDays, days_of
from scenarios.grid.feeder import (
    STEPS_PER_DAY,
    Feeder,
    PandapowerFlow,
    PowerFlow,
    bus_agent_graph,
    load_feeder,
    pv_feed_in,
)

__all__ = ["DRConfig", "DemandResponseEnv", "tariff"]

#: Observation bounds (see the env card).
_OBS_LOW = np.array([-20, 0, 0, 0, -1, -1, 0, -4, -1, 0], dtype=np.float32)
_OBS_HIGH = np.array([20, 20, 20, 1, 1, 1, 2, 4, 1, 1], dtype=np.float32)


@dataclass
class DRConfig(FeederDays):
    feeder: str = field(default="1-LV-semiurb4--0-sw", metadata={"help": "a SimBench LV code (1-LV-rural2--0-sw, ...)"})
    load_scale: float = field(default=1.0, metadata={"help": "factor on every household load"})
    pv_share: float = field(default=0.5, metadata={"help": "share of households given rooftop PV (0..1)"})
    pv_kwp: float = field(default=5.0, metadata={"help": "rooftop PV per household that has it, kWp"})
    battery_kwh: float = field(default=5.0, metadata={"help": "battery capacity per household, kWh"})
    battery_kw: float = field(default=2.5, metadata={"help": "battery power per household (both ways), kW"})
    efficiency: float = field(default=0.95, metadata={"help": "one-way battery efficiency (charge and discharge)"})
    soc_init: float = field(default=0.5, metadata={"help": "state of charge at the start of every episode"})
    soc_min: float = field(default=0.1, metadata={"help": "lowest state of charge allowed"})
    price_offpeak: float = field(default=0.22, metadata={"help": "€/kWh from 22:00 to 07:00"})
    price_day: float = field(default=0.30, metadata={"help": "€/kWh from 07:00 to 17:00 and 21:00 to 22:00"})
    price_peak: float = field(default=0.40, metadata={"help": "€/kWh from 17:00 to 21:00"})
    feed_in: float = field(default=0.08, metadata={"help": "€/kWh paid for exports"})
    reward: Literal["shared", "local", "share"] = field(
        default="shared", metadata={"help": "feeder-level terms, own terms, or own share of the feeder's (env card)"}
    )
    peak_weight: float = field(default=1.0, metadata={"help": "reward weight of (import / mean import)²"})
    cost_weight: float = field(default=1.0, metadata={"help": "reward weight of the normalised bill"})
    soc_weight: float = field(default=1.0, metadata={"help": "end-of-episode weight of |soc_end - soc_init|"})
    soc_above: float = field(
        default=1.0, metadata={"help": "factor on soc_weight when a battery ends above its start (0..1; 1: symmetric)"}
    )
    battery_export: bool = field(
        default=True, metadata={"help": "false: a battery discharges at most its household's own net load"}
    )
    forecast: Literal["none", "mean", "perfect"] = field(
        default="none",
        metadata={"help": "observe own PV surplus and deficit energy left today: none, last days' mean, exact"},
    )
    lag_days: int = field(default=7, metadata={"help": "forecast=mean: days of own meter history averaged"})
    day_end: Literal["truncation", "termination"] = field(
        default="truncation", metadata={"help": "how the episode's last step ends it (env card: Episode end)"}
    )
    action: Literal["absolute", "residual"] = field(
        default="absolute", metadata={"help": "battery share, or a correction to the local rule's share"}
    )
    residual_scale: float = field(
        default=2.0, metadata={"help": "residual mode: share = clip(local rule + scale*a, -1, 1); 0 < x <= 2"}
    )
    hops: int = field(default=6, metadata={"help": "households within this many feeder branches are linked"})
    max_iter: int = field(default=20, metadata={"help": "Newton-Raphson iterations per solve"})
    solver: Literal["lightsim2grid", "pandapower"] = field(
        default="lightsim2grid", metadata={"help": "power-flow engine; pandapower (runpp) is the slow reference"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("load_scale", "pv_kwp", "battery_kwh", "battery_kw", "max_iter"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"bad value for {name}: {getattr(self, name)}; expected > 0")
        for name in ("price_offpeak", "price_day", "price_peak", "feed_in", "peak_weight", "cost_weight", "soc_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"bad value for {name}: {getattr(self, name)}; expected >= 0")
        if not 0 <= self.soc_above <= 1:
            raise ConfigError(f"bad value for soc_above: {self.soc_above}; expected 0..1")
        if not 0 < self.residual_scale <= 2:
            raise ConfigError(f"bad value for residual_scale: {self.residual_scale}; expected 0 < x <= 2")
        if not 0 <= self.pv_share <= 1:
            raise ConfigError(f"bad value for pv_share: {self.pv_share}; expected 0..1")
        if not 0 < self.efficiency <= 1:
            raise ConfigError(f"bad value for efficiency: {self.efficiency}; expected 0 < x <= 1")
        if not 0 <= self.soc_min < 1:
            raise ConfigError(f"bad value for soc_min: {self.soc_min}; expected 0 <= x < 1")
        if not self.soc_min <= self.soc_init <= 1:
            raise ConfigError(f"bad value for soc_init: {self.soc_init}; expected soc_min..1 ({self.soc_min}..1)")
        if self.lag_days < 1:
            raise ConfigError(f"bad value for lag_days: {self.lag_days}; expected >= 1")
        if self.hops < 0:
            raise ConfigError(f"bad value for hops: {self.hops}; expected >= 0")
        if self.feeder.split("-")[1:2] != ["LV"]:
            raise ConfigError(f"bad feeder '{self.feeder}'; expected a SimBench LV code such as 1-LV-semiurb4--0-sw")


def tariff(config: DRConfig) -> np.ndarray:
    """Import price of each quarter hour of a day, €/kWh (the env card's time of use)."""
    hour = np.arange(STEPS_PER_DAY) * HOURS_PER_STEP
    price = np.full(STEPS_PER_DAY, config.price_day)
    price[(hour >= 22) | (hour < 7)] = config.price_offpeak
    price[(hour >= 17) & (hour < 21)] = config.price_peak
    return price


@functools.lru_cache(maxsize=8)
def _household_graph(feeder_name: str, hops: int) -> nx.Graph:
    """Households linked when their buses are within ``hops`` branches; ``distance``: Σ|z| in p.u."""
    feeder = load_feeder(feeder_name)
    return bus_agent_graph(feeder, feeder.load_bus, [f"house_{i}" for i in range(len(feeder.load_bus))], hops)


def _owner_of_sgens(feeder: Feeder) -> np.ndarray:
    """For each static generator, the household (load index) at its bus, else the nearest one."""
    owners = np.zeros(len(feeder.sgen_bus), dtype=np.int64)
    first: dict[int, int] = {}
    for i, b in enumerate(feeder.load_bus):
        first.setdefault(int(b), i)
    for j, b in enumerate(feeder.sgen_bus):
        if int(b) in first:
            owners[j] = first[int(b)]
            continue
        hops = nx.single_source_shortest_path_length(feeder.graph, int(b))
        owners[j] = first[min(first, key=lambda bus: hops.get(bus, 10**9))]
    return owners


class DemandResponseEnv(Scenario):
    """Household batteries shaving a feeder's peak; see the module docstring (env card)."""

    Config = DRConfig
    main_kpi = "peak_kw"
    kpi_goals = {
        "peak_kw": "min",
        "cost_eur": "min",
        "ramping_kw": "min",
        "one_minus_load_factor": "min",
        "import_kwh": "min",
        "export_kwh": "min",
        "losses_kwh": "min",
        "voltage_violation": "min",
        "violation_steps": "min",
        "overload_steps": "min",
        "max_loading": "min",
        "throughput_kwh": "min",
        "nonconverged": "min",
    }
    metadata = {"name": "grid_demand_response_v0", "render_modes": [], "is_parallelizable": True}

    def __init__(self, config: DRConfig | None = None, render_mode: str | None = None) -> None:
        self.config = c = config if config is not None else DRConfig()
        self._set_render_mode(render_mode)
        self.feeder: Feeder = load_feeder(c.feeder)
        f = self.feeder
        n = len(f.load_bus)
        self.possible_agents = [f"house_{i}" for i in range(n)]
        self.agents: list[str] = []
        self.house_bus = f.load_bus.copy()
        names = [str(x) for x in f.net.load["name"]]
        self._sim_ids = dict(zip(self.possible_agents, names if len(set(names)) == n else map(str, range(n))))
        self.days = days_of(c, f.n_steps // STEPS_PER_DAY)
        if len(self.days) == 0:
            raise ConfigError(f"no day in split={c.split} season={c.season}; allowed: another split or season")
        self.pf: PowerFlow | PandapowerFlow = (PowerFlow if c.solver == "lightsim2grid" else PandapowerFlow)(
            f, max_iter=c.max_iter
        )
        # Rooftop PV: evenly spread households, SimBench PV profiles round robin (env card).
        i = np.arange(n)
        has_pv = np.floor((i + 1) * c.pv_share) > np.floor(i * c.pv_share)
        profiles = pv_feed_in(c.feeder)
        self._roof_kw = np.zeros((f.n_steps, n))
        pv_houses = np.flatnonzero(has_pv)
        for k, h in enumerate(pv_houses):
            self._roof_kw[:, h] = c.pv_kwp * profiles[:, k % profiles.shape[1]]
        owner = _owner_of_sgens(f)
        self._sgen_to_house = np.zeros((len(owner), n))
        self._sgen_to_house[np.arange(len(owner)), owner] = 1.0
        self.has_pv = has_pv | np.isin(i, owner)
        self._price = tariff(c)
        self._slack = f.slack_bus
        self._trafo_mva = float(f.net.trafo.loc[f.net.trafo.in_service, "sn_mva"].sum()) or 1.0
        self._p_kw = c.battery_kw
        self._e_max = c.battery_kwh
        self._e_min = c.soc_min * c.battery_kwh
        # Reference powers of the reward: mean import without batteries over the profile year.
        year_net = self.household_net_kw(np.arange(f.n_steps))
        self.p_ref = max(float(year_net.sum(axis=1).mean()), 1e-3)
        self._house_ref = np.maximum(np.abs(year_net).mean(axis=0), 1e-3)
        extra = 0 if c.forecast == "none" else 2  # forecast: own surplus and deficit energy left today
        self._obs_low = np.concatenate([_OBS_LOW, np.zeros(extra, np.float32)])
        self._obs_high = np.concatenate([_OBS_HIGH, np.full(extra, 20.0, np.float32)])
        self._obs_space = spaces.Box(self._obs_low, self._obs_high, dtype=np.float32)
        self._ahead = np.zeros((STEPS_PER_DAY + 1, 2, n))  # forecast: energy left from each step, kWh
        self._act_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        nb = f.n_bus
        self.state_space = spaces.Box(
            np.concatenate([np.zeros(nb), np.zeros(n), np.full(n, -20.0), [-50, -1, -1, 0]]).astype(np.float32),
            np.concatenate([np.full(nb, 2.0), np.ones(n), np.full(n, 20.0), [50, 1, 1, 2]]).astype(np.float32),
            dtype=np.float32,
        )
        self._rng = np.random.default_rng()
        self.day = -1
        self._start = 0
        self._k = 0
        self._horizon = c.horizon
        self.energy = np.full(n, c.soc_init * c.battery_kwh)  #: stored energy per household, kWh
        self.battery = np.zeros(n)  #: battery power applied in the last step, kW (charging > 0)
        self.import_kw = 0.0  #: feeder import of the last step, kW
        self._day_mean_kw = 0.0  # the episode's mean Σ household net load (reward=share), kW
        self._net_sum = np.zeros(n)
        self._load_ep = self._pv_ep = np.zeros((1, n))  # this episode's loads and PV, kW
        zl, zs = np.zeros(n), np.zeros(len(f.sgen_bus))
        self._inj: tuple[np.ndarray, ...] = (zl, zl, zs, zs)  # injections of the last solve (MW, Mvar)
        self._reset_kpis()

    # ------------------------------------------------------------------ spaces
    def observation_space(self, agent: str) -> spaces.Box:
        return self._obs_space

    def action_space(self, agent: str) -> spaces.Box:
        return self._act_space

    @property
    def sim_ids(self) -> dict[str, str]:
        return dict(self._sim_ids)

    # ------------------------------------------------------------------ helpers used by controllers
    @property
    def t(self) -> int:
        """Index of the current 15-min interval in the profile year."""
        return self._start + self._k

    @property
    def step_in_day(self) -> int:
        """Steps played in this episode (0 at reset)."""
        return self._k

    @property
    def horizon(self) -> int:
        return self._horizon

    @property
    def prices(self) -> np.ndarray:
        """Import price of each quarter hour of the day, €/kWh."""
        return self._price

    def household_load_kw(self, t: np.ndarray | int) -> np.ndarray:
        """Household loads at interval(s) ``t`` of the year, kW (``[..., N]``)."""
        return self.feeder.load_p[t] * (1000.0 * self.config.load_scale)

    def household_pv_kw(self, t: np.ndarray | int) -> np.ndarray:
        """Household PV (rooftop + the feeder's own units it owns) at interval(s) ``t``, kW."""
        return self._roof_kw[t] + (self.feeder.sgen_p[t] * 1000.0) @ self._sgen_to_house

    def household_net_kw(self, t: np.ndarray | int) -> np.ndarray:
        """Load − PV per household at interval(s) ``t``, kW (batteries excluded)."""
        return self.household_load_kw(t) - self.household_pv_kw(t)

    def day_net_kw(self, day: int) -> np.ndarray:
        """``(96, N)`` household net loads of ``day`` (taken modulo the year), kW."""
        day = int(day) % (self.feeder.n_steps // STEPS_PER_DAY)
        return self.household_net_kw(np.arange(day * STEPS_PER_DAY, (day + 1) * STEPS_PER_DAY))

    def interval_kw(self) -> tuple[np.ndarray, np.ndarray]:
        """(load, PV) of every household in the interval about to be played, kW."""
        kk = min(self._k, self._horizon - 1)
        return self._load_ep[kk], self._pv_ep[kk]

    def battery_limits(self) -> tuple[np.ndarray, np.ndarray]:
        """(largest charge, largest discharge) power each battery can hold this interval, kW."""
        c = self.config
        charge = np.minimum(self._p_kw, (self._e_max - self.energy) / (c.efficiency * HOURS_PER_STEP))
        discharge = np.minimum(self._p_kw, (self.energy - self._e_min) * c.efficiency / HOURS_PER_STEP)
        return np.maximum(charge, 0.0), np.maximum(discharge, 0.0)

    def local_rule_kw(self, evening: tuple[float, float] = (17.0, 21.0), refill_end: float = 6.0) -> np.ndarray:
        """Battery power (kW, charging > 0) the local rule asks of every household this interval,
        before the battery's limits: its own PV surplus in; in the ``evening`` hours its own net
        load out; before ``refill_end`` the energy missing to ``soc_init`` in, spread over the
        hours left (the ``local-rule`` controller and the residual mode's base)."""
        c = self.config
        load, pv = self.interval_kw()
        net = load - pv
        hour = (self.t % STEPS_PER_DAY) * HOURS_PER_STEP
        b = np.zeros_like(net)
        surplus = net < 0
        b[surplus] = -net[surplus]
        if evening[0] <= hour < evening[1]:
            b[~surplus] = -net[~surplus]
        elif hour < refill_end:
            missing = np.maximum(c.soc_init * c.battery_kwh - self.energy, 0.0) / c.efficiency
            b = np.maximum(b, missing / (refill_end - hour))
        return b

    def _base_share(self) -> np.ndarray:
        """The local rule's battery share within this interval's limits (the residual mode's base)."""
        charge, discharge = self.battery_limits()
        return np.clip(np.clip(self.local_rule_kw(), -discharge, charge) / self._p_kw, -1.0, 1.0)

    def encode_actions(self, a: np.ndarray) -> np.ndarray:
        """Battery shares ``[N, 1]`` as this env's actions: the grid baselines' hook. Absolute
        mode: the shares, clipped. Residual mode: the corrections to the local rule that play them
        (exact for every share in [-1, 1] when ``residual_scale`` is 2)."""
        share = np.clip(np.asarray(a, dtype=np.float64), -1.0, 1.0)
        if self.config.action == "residual":
            share = np.clip((share - self._base_share()[:, None]) / self.config.residual_scale, -1.0, 1.0)
        return share.astype(np.float32)

    # ------------------------------------------------------------------ PettingZoo API
    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        c = self.config
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        day = (options or {}).get("day")
        if day is None:
            day = c.day if c.day >= 0 else int(self._rng.choice(self.days))
        elif int(day) not in self.days:
            raise ConfigError(f"bad reset day {day}: not a day of split={c.split} season={c.season}")
        self.day = int(day)
        self._start = self.day * STEPS_PER_DAY
        self._horizon = min(c.horizon, self.feeder.n_steps - self._start)
        self._k = 0
        self.agents = list(self.possible_agents)
        n = len(self.possible_agents)
        self.energy = np.full(n, c.soc_init * c.battery_kwh)
        self.battery = np.zeros(n)
        steps = np.arange(self._start, self._start + self._horizon)
        self._load_ep = self.household_load_kw(steps)
        self._pv_ep = self.household_pv_kw(steps)
        self._day_mean_kw = float((self._load_ep - self._pv_ep).sum(axis=1).mean())  # share reward's m
        self._net_sum = np.zeros(n)  # Σ_t net_i so far (share reward's last-step correction)
        if c.forecast != "none":
            self._ahead = self._energy_ahead()
        self._reset_kpis()
        self.pf.reset()
        self._solve(self.battery)  # what the households measure before their first decision
        infos = {a: {"day": self.day} for a in self.agents}
        return self._observations(), infos

    def _energy_ahead(self) -> np.ndarray:
        """``[96·D + 1, 2, N]`` for an episode of D days: each household's forecast PV surplus
        ``Σ max(pv − load, 0)·Δt`` and deficit ``Σ max(load − pv, 0)·Δt`` (kWh) from each step to
        the end of its day (``forecast``: the mean of its meter's last ``lag_days`` days before
        that day, or that day exactly); the last row, after the episode, is zero."""
        c = self.config
        n_days = -(-self._horizon // STEPS_PER_DAY)
        ahead = np.zeros((n_days * STEPS_PER_DAY + 1, 2, len(self.possible_agents)))
        for i, day in enumerate(range(self.day, self.day + n_days)):
            days = [day] if c.forecast == "perfect" else [day - k for k in range(1, c.lag_days + 1)]
            net = np.stack([self.day_net_kw(d) for d in days])  # [D, 96, N], batteries excluded
            per_step = np.stack([np.maximum(-net, 0).mean(axis=0), np.maximum(net, 0).mean(axis=0)], axis=1)
            ahead[i * STEPS_PER_DAY : (i + 1) * STEPS_PER_DAY] = (
                np.cumsum(per_step[::-1], axis=0)[::-1] * HOURS_PER_STEP
            )
        return ahead

    def _actions(self, actions: dict[str, Any]) -> np.ndarray:
        n = len(self.possible_agents)
        try:  # fast path: one scalar action per possible agent
            a = np.array([actions[ag] for ag in self.possible_agents], dtype=np.float64).reshape(n)
        except (KeyError, ValueError, TypeError):
            a = np.zeros(n)
            for i, agent in enumerate(self.possible_agents):
                if agent in actions:
                    a[i] = np.asarray(actions[agent], dtype=np.float64).reshape(-1)[0]
        a[np.isnan(a)] = 0.0
        return np.clip(a, -1.0, 1.0)

    def step(self, actions: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        if not self.agents:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        c = self.config
        charge, discharge = self.battery_limits()
        share = self._actions(actions)
        if c.action == "residual":
            share = np.clip(self._base_share() + c.residual_scale * share, -1.0, 1.0)
        if not c.battery_export:  # discharge covers the household's own net load, no more
            load, pv = self.interval_kw()
            discharge = np.minimum(discharge, np.maximum(load - pv, 0.0))
        b = np.clip(share * self._p_kw, -discharge, charge)
        self.energy = np.clip(
            self.energy + (c.efficiency * np.maximum(b, 0) - np.maximum(-b, 0) / c.efficiency) * HOURS_PER_STEP,
            self._e_min,
            self._e_max,
        )
        self.battery = b
        t, kk = self.t, self._k
        net = self._load_ep[kk] - self._pv_ep[kk] + b
        ok = self._solve(b)
        s = self.pf.bus_power()
        imp = float(s[self._slack].real) * 1000.0  # what the slack (MV grid) supplies
        self.import_kw = imp
        price = self._price[t % STEPS_PER_DAY]
        bills = (price * np.maximum(net, 0) - c.feed_in * np.maximum(-net, 0)) * HOURS_PER_STEP
        v = self.pf.vm
        out = np.maximum(v - c.v_max, 0.0) + np.maximum(c.v_min - v, 0.0)
        k = self._kpi
        self._imports.append(imp)
        k["bill"] += float(bills.sum())
        k["losses_kwh"] += float(s.real.sum()) * 1000.0 * HOURS_PER_STEP
        k["voltage_violation"] += float(out.sum())
        k["violation_steps"] += float(out.any())
        loading = abs(complex(s[self._slack])) / self._trafo_mva
        k["overload_steps"] += float(loading > 1.0)
        k["max_loading"] = max(k["max_loading"], loading)
        k["throughput_kwh"] += float(np.abs(b).sum()) * HOURS_PER_STEP
        k["nonconverged"] += float(not ok)

        self._k += 1
        done = self._k >= self._horizon
        scale = self._p_kw * HOURS_PER_STEP * max(c.price_peak, 1e-9)
        agents = list(self.agents)
        if c.reward == "shared":
            r = -c.peak_weight * (imp / self.p_ref) ** 2 - c.cost_weight * float(bills.sum()) / (len(agents) * scale)
            if done:
                r -= float(self._soc_penalty().mean())
            rewards = dict.fromkeys(agents, r)
        else:
            if c.reward == "share":  # own share of the feeder's deviation from the day's mean (env card)
                n = len(net)
                peak = c.peak_weight * n * net * (imp - self._day_mean_kw) / self.p_ref**2
                self._net_sum += net
                if done:  # re-centre on the day's realised mean import: stored energy buys nothing
                    shift = float(np.mean(self._imports)) - self._day_mean_kw
                    peak = peak - c.peak_weight * n * self._net_sum * shift / self.p_ref**2
                    # energy missing at the end, bought back off-peak: the cost_eur KPI's rule
                    missing = c.soc_init * c.battery_kwh - self.energy
                    bills = bills + missing * c.price_offpeak / c.efficiency
            else:
                peak = c.peak_weight * (net / self._house_ref) ** 2
            local = -peak - c.cost_weight * bills / scale
            if done:
                local -= self._soc_penalty()
            rewards = dict(zip(self.possible_agents, local.tolist()))
        terminal = done and c.day_end == "termination"
        terms = dict.fromkeys(agents, terminal)
        truncs = dict.fromkeys(agents, done and not terminal)
        infos = {ag: {"day": self.day, "step": kk} for ag in agents}
        if done:
            self.agents = []
        return self._observations(), rewards, terms, truncs, infos

    def _soc_penalty(self) -> np.ndarray:
        """End-of-episode penalty per household: ``soc_weight·|soc_end − soc_init|``, times
        ``soc_above`` when the battery ends above its start (env card: Reward)."""
        c = self.config
        d = self.energy / c.battery_kwh - c.soc_init
        return c.soc_weight * np.where(d > 0, c.soc_above * d, -d)

    def _solve(self, b: np.ndarray) -> bool:
        f, t = self.feeder, min(self.t, self.feeder.n_steps - 1)
        load_p = f.load_p[t] * self.config.load_scale + (b - self._roof_kw[t]) / 1000.0
        load_q = f.load_q[t] * self.config.load_scale
        zeros = np.zeros(len(f.sgen_bus))
        self._inj = (load_p, load_q, f.sgen_p[t], zeros)
        return self.pf.solve(*self._inj)

    def _observations(self) -> dict[str, np.ndarray]:
        c = self.config
        t = min(self.t, self.feeder.n_steps - 1)
        kk = min(self._k, self._horizon - 1)  # after the last step: the last interval again
        load, pv = self._load_ep[kk], self._pv_ep[kk]
        p = self._p_kw
        tod = 2 * np.pi * (t % STEPS_PER_DAY) / STEPS_PER_DAY
        obs = np.empty((len(self.possible_agents), len(self._obs_low)))
        obs[:, 0] = (load - pv) / p
        obs[:, 1] = load / p
        obs[:, 2] = pv / p
        obs[:, 3] = self.energy / c.battery_kwh
        obs[:, 4] = np.sin(tod)
        obs[:, 5] = np.cos(tod)
        obs[:, 6] = self._price[t % STEPS_PER_DAY] / max(c.price_peak, 1e-9)
        obs[:, 7] = (self.pf.vm[self.house_bus] - 1.0) / 0.05
        obs[:, 8] = self.battery / p
        obs[:, 9] = (self._horizon - self._k) / self._horizon
        if c.forecast != "none":
            obs[:, 10:12] = self._ahead[min(self._k, len(self._ahead) - 1)].T / c.battery_kwh
        obs = np.clip(obs, self._obs_low, self._obs_high).astype(np.float32)
        return dict(zip(self.possible_agents, obs))

    # ------------------------------------------------------------------ Concord extras
    def state(self) -> np.ndarray:
        """Bus voltages, households' soc and (load − pv)/P, import/P_ref, sin/cos(tod), price
        (see the env card); float32 of length ``n_bus + 2·N + 4``."""
        c = self.config
        t = min(self.t, self.feeder.n_steps - 1)
        tod = 2 * np.pi * (t % STEPS_PER_DAY) / STEPS_PER_DAY
        kk = min(self._k, self._horizon - 1)
        net = np.clip((self._load_ep[kk] - self._pv_ep[kk]) / self._p_kw, -20, 20)
        tail = [np.clip(self.import_kw / self.p_ref, -50, 50), np.sin(tod), np.cos(tod)]
        tail.append(min(self._price[t % STEPS_PER_DAY] / max(c.price_peak, 1e-9), 2.0))
        vm = np.clip(self.pf.vm, 0.0, 2.0)
        return np.concatenate([vm, self.energy / c.battery_kwh, net, tail]).astype(np.float32)

    @property
    def topology(self) -> nx.Graph:
        return _household_graph(self.config.feeder, self.config.hops)

    def _reset_kpis(self) -> None:
        self._imports: list[float] = []
        self._kpi = dict.fromkeys(
            (
                "bill",
                "losses_kwh",
                "voltage_violation",
                "violation_steps",
                "overload_steps",
                "max_loading",
                "throughput_kwh",
                "nonconverged",
            ),
            0.0,
        )

    def episode_kpis(self) -> dict[str, float]:
        c = self.config
        k = dict(self._kpi)
        imports = np.array(self._imports) if self._imports else np.zeros(1)
        peak = float(imports.max())
        start = len(self.possible_agents) * c.soc_init * c.battery_kwh
        change = float(self.energy.sum()) - start
        out = {
            "peak_kw": peak,
            # energy missing at the end is bought back off-peak (through the charger's losses)
            "cost_eur": k.pop("bill") - change * c.price_offpeak / c.efficiency,
            "ramping_kw": float(np.abs(np.diff(imports)).sum()),
            "one_minus_load_factor": 1.0 - float(imports.mean()) / peak if peak > 0 else 0.0,
            "import_kwh": float(np.maximum(imports, 0).sum()) * HOURS_PER_STEP,
            "export_kwh": float(np.maximum(-imports, 0).sum()) * HOURS_PER_STEP,
            **k,
            "soc_change_kwh": change,
            "day": float(self.day),
        }
        return {key: float(v) for key, v in out.items()}

    def close(self) -> None:
        self.agents = []
