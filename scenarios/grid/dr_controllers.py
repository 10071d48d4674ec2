"""Baselines of ``grid/demand-response``: local rule, LP optimum, decentralised consensus.

(No control is the grid domain's ``no-control``: every battery idle.)

* :class:`LocalRule` — what a household battery does on its own today: charge from its own PV
  surplus, discharge to cover its own load in the evening peak window (17:00–21:00), and
  refill to the initial charge during the night (00:00–06:00), spread evenly over the hours
  left so that the feeder does not see every battery start at midnight.
* :class:`LPOptimum` — the bound: a centralised planner with perfect foresight of every
  household's load and PV for the whole episode solves one linear programme (HiGHS, through
  ``scipy.optimize.linprog``) at reset: minimise the feeder's peak import, then (small weights)
  its ramping and the batteries' throughput, subject to every battery's power, energy and
  efficiency and to each battery ending at least as full as it started. The feeder is lossless
  in the LP (import = Σ household net loads); the env's AC power flow then plays the schedule.
* :class:`ConsensusShaving` — decentralised: each household knows only itself. Every step it
  sends, through the run's protocol and channel, a payload of its current deviation from its
  own forecast, its stored energy and a 96-value forecast of its own net load for the day. The
  default ``forecast=perfect`` gives each household its own day exactly — the information the
  LP bound has, so that the gap to the LP measures decentralisation and the channel, not
  forecasting; ``forecast=mean`` (mean of its meter's last ``lag_days`` days) and
  ``persistence`` (the day ``lag_days`` back) are the realistic variants. The forecast is
  static, so its network average converges over the first steps (``warmup``: batteries idle
  while it settles); only the deviation moves. With the
  ``consensus`` protocol (``--protocol consensus``: Metropolis rounds over the feeder topology,
  acknowledged exchanges so that loss slows but does not bias the average) it runs *dynamic
  average consensus* (Zhu & Martínez, Automatica 2010; Kia et al., IEEE CSM 2019): the
  payload is its last estimate plus the change of its own values since the last step, so the
  network sum of estimates always equals the sum of current values and every estimate tracks
  the average of the moving inputs. ``N ×`` the estimate gives the feeder aggregate (crashed
  households count as average ones). From the agreed aggregate now, the agreed forecast for
  the rest of the episode and the agreed stored energy, each household computes the same two
  levels (:func:`peak_target`): the lowest peak ``T`` one battery of the fleet's size (total
  power, energy and efficiency) can hold while ending the day at its initial charge, and the
  lowest valley level ``V ≤ T`` it must charge up to for that (peak shaving and valley
  filling). ``T`` is never set below the import it believes the feeder already reached
  today (shaving below it buys nothing). The fleet's battery power is
  ``clip(V − aggregate, 0, P) − clip(aggregate − T, 0, P)``; each household takes the share of
  it that its own room (charging) or usable energy (discharging) is of the agreed total,
  within its own limits.
  Without usable messages (``--protocol none`` or a summary protocol, or a household that hears
  nothing because it crashed) the estimate is the household's own values alone: it flattens
  its own profile scaled up to the feeder, which is what a lone battery with a peak target
  would do. ``marl run`` builds no consensus without ``--protocol consensus``: the controller
  then warns once.

The controllers act for the households through ``env`` helpers
(``interval_kw``, ``battery_limits``, ``day_net_kw``, ``energy``); the consensus controller
reads other households only through ``messages``. On a grid env that is not demand response
(the voltage scenarios share the ``grid`` controller names) they leave every agent idle, with a
warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from marl.core.controller import Controller
from scenarios.grid.env import HOURS_PER_STEP
from scenarios.grid.feeder import STEPS_PER_DAY

__all__ = ["LocalRule", "LPOptimum", "ConsensusShaving", "peak_target"]


def _is_dr(env: Any) -> bool:
    from scenarios.grid.demand_response import DemandResponseEnv

    return isinstance(env, DemandResponseEnv)


def _idle(env: Any, name: str) -> dict[str, np.ndarray]:
    """Zero actions on a grid env that is not demand response (with a warning)."""
    warnings.warn(f"controller {name} is for grid/demand-response; every agent stays idle here", stacklevel=3)
    shape = env.action_space(env.possible_agents[0]).shape
    a = env.encode_actions(np.zeros((len(env.possible_agents), *shape)))
    return {agent: a[i] for i, agent in enumerate(env.possible_agents) if agent in env.agents}


def _to_actions(env: Any, b_kw: np.ndarray) -> dict[str, np.ndarray]:
    """Battery powers (kW, charging > 0) as the env's actions, limited to what each battery can do."""
    charge, discharge = env.battery_limits()
    a = np.clip(b_kw, -discharge, charge) / env.config.battery_kw
    a = env.encode_actions(np.clip(a, -1.0, 1.0)[:, None])  # residual mode: the correction that plays it
    return {agent: a[i] for i, agent in enumerate(env.possible_agents) if agent in env.agents}


@dataclass
class LocalRuleConfig:
    evening_start: float = field(default=17.0, metadata={"help": "hour the evening discharge starts"})
    evening_end: float = field(default=21.0, metadata={"help": "hour the evening discharge ends"})
    refill_end: float = field(default=6.0, metadata={"help": "night refill runs from 00:00 to this hour"})


class LocalRule(Controller):
    """Own PV surplus in, own evening load out, night refill (see the module docstring)."""

    Config = LocalRuleConfig

    def act(self, observations: dict[str, np.ndarray], env: Any, messages: Any = None) -> dict[str, Any]:
        if not _is_dr(env):
            return _idle(env, "local-rule")
        cfg = self.config
        return _to_actions(env, env.local_rule_kw((cfg.evening_start, cfg.evening_end), cfg.refill_end))


@dataclass
class LPConfig:
    ramp_weight: float = field(default=0.01, metadata={"help": "LP cost per kW of ramping (peak costs 1 per kW)"})
    throughput_weight: float = field(default=1e-3, metadata={"help": "LP cost per kWh through the batteries"})


class LPOptimum(Controller):
    """Perfect-foresight peak-minimising schedule from one LP per episode (HiGHS)."""

    Config = LPConfig

    def __init__(self, env: Any, config: Any = None) -> None:
        super().__init__(env, config)
        self.schedule: np.ndarray | None = None  #: (N, H) battery power, kW
        self.planned_peak = float("nan")  #: the LP's (lossless) peak import, kW

    def reset(self, env: Any, seed: int | None = None) -> None:
        self.schedule = self.plan(env) if _is_dr(env) else None

    def plan(self, env: Any) -> np.ndarray:
        """Solve the episode's LP; returns the (N, H) battery schedule in kW."""
        import scipy.sparse as sp
        from scipy.optimize import linprog

        c, cfg = env.config, self.config
        h = env.horizon
        start = env.day * STEPS_PER_DAY
        net = env.household_net_kw(np.arange(start, start + h)).T  # (N, H)
        n = net.shape[0]
        m = n * h
        eta, dt = c.efficiency, HOURS_PER_STEP
        e0 = c.soc_init * c.battery_kwh
        # variables: charge (m), discharge (m), energy (m), peak (1), ramp (h - 1); index i*h + t
        nv = 3 * m + 1 + (h - 1)
        ch, dis, en, pk, rp = 0, m, 2 * m, 3 * m, 3 * m + 1
        idx = np.arange(m)
        first = idx % h == 0
        # energy balance: e_t - e_{t-1} - eta*dt*c_t + dt/eta*d_t = 0 (e_{-1} = e0 moved right)
        rows = np.concatenate([idx, idx[~first], idx, idx])
        cols = np.concatenate([en + idx, en + idx[~first] - 1, ch + idx, dis + idx])
        vals = np.concatenate([np.ones(m), -np.ones((~first).sum()), np.full(m, -eta * dt), np.full(m, dt / eta)])
        a_eq = sp.csr_matrix((vals, (rows, cols)), shape=(m, nv))
        b_eq = np.where(first, e0, 0.0)
        # import_t = sum_i net + c - d  <= peak  ;  |import_t - import_{t-1}| <= ramp_t
        t_of = idx % h
        agg = sp.csr_matrix(
            (
                np.concatenate([np.ones(m), -np.ones(m)]),
                (np.concatenate([t_of, t_of]), np.concatenate([ch + idx, dis + idx])),
            ),
            shape=(h, nv),
        )
        base = net.sum(axis=0)
        peak_rows = agg - sp.csr_matrix((np.ones(h), (np.arange(h), np.full(h, pk))), shape=(h, nv))
        diff = agg[1:] - agg[:-1]
        ramp = sp.csr_matrix((np.ones(h - 1), (np.arange(h - 1), rp + np.arange(h - 1))), shape=(h - 1, nv))
        # each battery ends at least as full as it started: -e_{H-1} <= -e0
        last = np.flatnonzero(t_of == h - 1)
        end = sp.csr_matrix((-np.ones(n), (np.arange(n), en + last)), shape=(n, nv))
        a_ub = sp.vstack([peak_rows, diff - ramp, -diff - ramp, end]).tocsc()
        b_ub = np.concatenate([-base, -np.diff(base), np.diff(base), np.full(n, -e0)])
        cost = np.zeros(nv)
        cost[pk] = 1.0
        cost[rp:] = cfg.ramp_weight
        cost[ch:en] = cfg.throughput_weight * dt
        p = c.battery_kw
        bounds = np.array(
            [(0, p)] * (2 * m)
            + [(c.soc_min * c.battery_kwh, c.battery_kwh)] * m
            + [(None, None)]
            + [(0, None)] * (h - 1),
            dtype=object,
        )
        res = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, bounds=list(map(tuple, bounds)), method="highs")
        if res.status != 0:  # infeasible cannot happen (idle batteries are feasible); be safe
            warnings.warn(f"lp-optimum: HiGHS status {res.status} ({res.message}); batteries idle", stacklevel=2)
            self.planned_peak = float(base.max())
            return np.zeros((n, h))
        self.planned_peak = float(res.x[pk])
        return (res.x[ch:dis] - res.x[dis:en]).reshape(n, h)

    def act(self, observations: dict[str, np.ndarray], env: Any, messages: Any = None) -> dict[str, Any]:
        if self.schedule is None:
            return _idle(env, "lp-optimum")
        return _to_actions(env, self.schedule[:, min(env.step_in_day, self.schedule.shape[1] - 1)])


def _feasible(
    loads: np.ndarray, peak: np.ndarray, valley: np.ndarray, fleet: tuple[float, ...], stored: np.ndarray
) -> np.ndarray:
    """(N, K) whether one battery of the fleet's size, charging up to ``valley`` below it and
    discharging down to ``peak`` above it (levels (N, K), kW), never runs short over ``loads``
    (N, L) and ends with at least ``e_end``. ``fleet`` = (power, e_min, e_max, e_end, eta)."""
    power, e_min, e_max, e_end, eta = fleet
    e = np.repeat(stored[:, None], peak.shape[1], axis=1)
    ok = np.ones(peak.shape, dtype=bool)
    for t in range(loads.shape[1]):
        load = loads[:, t : t + 1]
        charge = np.minimum(np.clip(valley - load, 0, power) * eta * HOURS_PER_STEP, e_max - e)
        need = np.clip(load - peak, 0, power) * HOURS_PER_STEP / eta
        ok &= (need <= (e - e_min) + 1e-6) & (load - peak <= power + 1e-6)
        e = np.maximum(e + charge - need, e_min)
    return ok & (e >= e_end - 1e-6)


def _lowest(ok: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the lowest level with ``ok`` (else the highest) and its index."""
    last = levels.shape[1] - 1
    first = np.where(ok.any(axis=1), ok.argmax(axis=1), last)
    return levels[np.arange(len(levels)), first], first


def peak_target(
    loads: np.ndarray,
    stored: np.ndarray,
    fleet: tuple[float, ...],
    candidates: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """(peak level ``T``, valley level ``V``) per row (one row per household's view).

    ``loads``: (N, L) aggregate net load of this interval and the forecast rest, kW; ``stored``:
    (N,) each view's agreed stored energy, kWh; ``fleet`` = (power kW, e_min, e_max, e_end kWh,
    efficiency) of all batteries together. ``T`` is the lowest import one battery of the fleet's
    size can hold over ``loads`` while ending with at least ``e_end``; for it, charging
    greedily up to ``T`` is optimal. ``V`` ≤ ``T`` is then the lowest charging level that still
    makes ``T`` feasible: charging only as much as the peak needs keeps a forecast that is too
    high from raising the night's import to ``T``. Feasibility grows with either level, so each
    is found on a grid of ``candidates`` levels refined once (resolution: the load range /
    candidates²). Rows where nothing is feasible get the highest levels (charge, never discharge).
    """
    power = fleet[0]
    k = np.arange(candidates + 1) / candidates
    lo, hi = loads.min(axis=1) - power, loads.max(axis=1)
    for _ in range(2):  # T with V = T
        levels = lo[:, None] + (hi - lo)[:, None] * k[None, :]
        peak, first = _lowest(_feasible(loads, levels, levels, fleet, stored), levels)
        step = (hi - lo) / candidates
        lo, hi = np.where(first > 0, peak - step, peak), peak
    peak = hi
    lo, hi = loads.min(axis=1) - power, peak.copy()
    for _ in range(2):  # V with T fixed
        levels = lo[:, None] + (hi - lo)[:, None] * k[None, :]
        ok = _feasible(loads, np.repeat(peak[:, None], candidates + 1, axis=1), levels, fleet, stored)
        valley, first = _lowest(ok, levels)
        step = (hi - lo) / candidates
        lo, hi = np.where(first > 0, valley - step, valley), valley
    return peak, hi


@dataclass
class ConsensusConfig:
    forecast: Literal["perfect", "mean", "persistence"] = field(
        default="perfect",
        metadata={
            "help": "own net-load forecast: exact (the LP's information), the mean of the last lag_days days, "
            "or the day lag_days back"
        },
    )
    lag_days: int = field(default=7, metadata={"help": "days of own meter history the forecast reads"})

    warmup: int = field(default=8, metadata={"help": "first steps of an episode spent agreeing, batteries idle"})


class ConsensusShaving(Controller):
    """Agree on the feeder aggregate by dynamic average consensus, then shave toward a flat target."""

    Config = ConsensusConfig
    payload_size = 2 + STEPS_PER_DAY  #: net load now (kW), stored energy (kWh), 96 forecast values (kW)

    def __init__(self, env: Any, config: Any = None) -> None:
        super().__init__(env, config)
        if self.config.lag_days < 1:
            from marl.core.errors import ConfigError

            raise ConfigError(f"bad value for lag_days: {self.config.lag_days}; expected >= 1")
        self._warned = False
        self._values: np.ndarray | None = None
        self._estimate: np.ndarray | None = None
        self._forecast: np.ndarray | None = None
        self.heard_steps = 0  #: steps this episode in which messages were usable
        self._reached = np.zeros(0)

    def reset(self, env: Any, seed: int | None = None) -> None:
        self._values = self._estimate = self._forecast = None
        self._reached = np.full(len(env.possible_agents), -np.inf)  # each view's peak import so far, kW
        self.heard_steps = 0
        if _is_dr(env):
            cfg = self.config
            if cfg.forecast == "perfect":
                days = [env.day]
            elif cfg.forecast == "persistence":
                days = [env.day - cfg.lag_days]
            else:
                days = [env.day - k for k in range(1, cfg.lag_days + 1)]
            # (N, 96): each row is one household's own meter readings
            self._forecast = np.mean([env.day_net_kw(d) for d in days], axis=0).T

    def _own_values(self, env: Any) -> np.ndarray:
        load, pv = env.interval_kw()
        assert self._forecast is not None
        # the forecast is static, so its average converges; only the deviation from it moves
        now = min(env.step_in_day, STEPS_PER_DAY - 1)
        return np.column_stack([load - pv - self._forecast[:, now], env.energy, self._forecast])

    def payload(self, observations: dict[str, np.ndarray], env: Any) -> dict[str, np.ndarray]:
        if not _is_dr(env):
            return {a: np.zeros(self.payload_size) for a in env.agents}
        values = self._own_values(env)
        if self._estimate is None or self._values is None:
            send = values
        else:  # dynamic consensus: last estimate plus the change of the own inputs
            send = self._estimate + (values - self._values)
        return {a: send[i] for i, a in enumerate(env.possible_agents) if a in env.agents}

    def act(self, observations: dict[str, np.ndarray], env: Any, messages: Any = None) -> dict[str, Any]:
        if not _is_dr(env):
            return _idle(env, "consensus")
        values = self._own_values(env)
        usable = messages is not None and all(
            len(messages.get(a, ())) == self.payload_size for a in env.possible_agents
        )
        if usable:
            estimate = np.stack([np.asarray(messages[a], dtype=np.float64) for a in env.possible_agents])
            self.heard_steps += 1
        else:
            if not self._warned:
                warnings.warn(
                    "consensus controller got no consensus messages (use --protocol consensus); "
                    "each household acts on its own values alone",
                    stacklevel=2,
                )
                self._warned = True
            estimate = values
        self._values, self._estimate = values, estimate
        c = env.config
        if env.step_in_day < self.config.warmup:  # the forecast's average has not settled yet
            return _to_actions(env, np.zeros(len(env.possible_agents)))
        n = len(env.possible_agents)
        k, h = env.step_in_day, env.horizon
        aggregate = n * (estimate[:, 2 + min(k, STEPS_PER_DAY - 1)] + estimate[:, 0])
        stored = n * estimate[:, 1]
        # episodes start at 00:00; the forecast covers one day (longer episodes plan to midnight)
        future = n * estimate[:, 2 + k + 1 : 2 + min(h, STEPS_PER_DAY)]
        power = n * c.battery_kw
        fleet = (
            power,
            n * c.soc_min * c.battery_kwh,
            n * c.battery_kwh,
            n * c.soc_init * c.battery_kwh,
            c.efficiency,
        )
        peak, valley = peak_target(np.column_stack([aggregate, future]), stored, fleet)
        # never discharge below the import this household believes the feeder already reached
        peak = np.maximum(peak, self._reached)
        fleet_kw = np.clip(valley - aggregate, 0, power) - np.clip(aggregate - peak, 0, power)
        self._reached = np.maximum(self._reached, aggregate + fleet_kw)
        # this household's share: its room (charging) or its usable energy (discharging)
        room = np.maximum(n * c.battery_kwh - stored, 1e-9)
        usable_energy = np.maximum(stored - n * c.soc_min * c.battery_kwh, 1e-9)
        own_room = c.battery_kwh - env.energy
        own_energy = env.energy - c.soc_min * c.battery_kwh
        b = np.where(fleet_kw > 0, fleet_kw * own_room / room, fleet_kw * own_energy / usable_energy)
        return _to_actions(env, b)
