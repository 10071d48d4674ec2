"""Baselines for the grid scenarios: no control, local volt-var, centralised optimal dispatch.

* :class:`NoControl` — every inverter at unity power factor (q = 0), no curtailment.
* :class:`VoltVar` — the IEEE 1547-2018 default volt-var curve for Category B DER (IEEE Std
  1547-2018, Table 8): Q = +0.44 S at V ≤ 0.92, 0 between 0.98 and 1.02, −0.44 S at V ≥ 1.08
  (p.u. of nominal voltage; Q in p.u. of nameplate apparent power S, positive = injection),
  linear in between. Each inverter reads only its own bus voltage (observation entry 0, in p.u.
  via ``env.observed_voltages()``, measured at the start of the interval with the previous
  set-point held) and its available reactive
  power; the command is limited to sqrt(S² − P²).
* :class:`OptimalDispatch` — the full-information upper reference: every step it chooses all
  reactive powers (and curtailments when the env allows them) by sequential linear
  programming: linearise the AC power flow at the current point (exact Newton-Raphson Jacobian
  from the admittance matrix), solve a linear programme with HiGHS (``scipy.optimize.linprog``)
  that minimises voltage-band violation first (weight 1e5 per p.u.) and then Σ|q|/S (and
  curtailment, weighted higher), re-solve the AC power flow at the result and repeat (at most
  ``iterations`` times) until the AC solution is within the band; of the dispatches checked,
  the one in band (else with least violation), then with least effort, is sent. Keeping a small ``margin``
  inside the band absorbs the linearisation error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from marl.core.controller import Controller

__all__ = ["NoControl", "VoltVar", "OptimalDispatch", "volt_var_curve", "voltage_sensitivities"]

#: IEEE 1547-2018 Category B default volt-var points: (V p.u., Q p.u. of S).
IEEE1547_CAT_B = ((0.92, 0.44), (0.98, 0.0), (1.02, 0.0), (1.08, -0.44))


def volt_var_curve(v: np.ndarray, points: tuple[tuple[float, float], ...] = IEEE1547_CAT_B) -> np.ndarray:
    """Reactive power (p.u. of S) of the piecewise-linear volt-var curve; flat beyond its ends."""
    xs, ys = zip(*points)
    return np.interp(v, xs, ys)


class NoControl(Controller):
    """q = 0 (unity power factor) for every inverter."""

    def act(self, observations: dict[str, np.ndarray], env: Any, messages: Any = None) -> dict[str, np.ndarray]:
        shape = env.action_space(env.possible_agents[0]).shape
        a = env.encode_actions(np.zeros((len(env.possible_agents), *shape)))
        return {agent: a[i] for i, agent in enumerate(env.possible_agents) if agent in env.agents}


class VoltVar(Controller):
    """Local IEEE 1547-2018 Category B volt-var (see the module docstring)."""

    def act(self, observations: dict[str, np.ndarray], env: Any, messages: Any = None) -> dict[str, np.ndarray]:
        dim = env.action_space(env.possible_agents[0]).shape[0]
        p = env.pv_available()
        q_avail = np.sqrt(np.maximum(env.agent_s_mva**2 - p**2, 0.0))
        live = [i for i, agent in enumerate(env.possible_agents) if agent in observations]
        v = env.observed_voltages().astype(np.float64)  # observation entry 0, in p.u.
        q = volt_var_curve(v) * env.agent_s_mva
        a = np.zeros((len(v), dim))
        a[:, 0] = np.clip(np.divide(q, q_avail, out=np.zeros_like(q), where=q_avail > 0), -1.0, 1.0)
        a = env.encode_actions(a)  # the same set-points in residual action mode
        return {env.possible_agents[i]: a[i] for i in live}


def voltage_sensitivities(
    ybus: Any, v: np.ndarray, slack: int, buses: np.ndarray, sn_mva: float
) -> tuple[np.ndarray, np.ndarray]:
    """dVm/dQ and dVm/dP (p.u. per MVar / MW injected at ``buses``) at the solution ``v``.

    From the polar Newton-Raphson Jacobian of the power-flow equations (every bus but the slack is
    PQ): J·[dθ; d|V|] = [dP; dQ], factorised once with sparse LU (dense BLAS was ~100x slower
    on a shared, oversubscribed machine). Rows: all buses (the slack row is 0); columns: ``buses``.
    """
    import scipy.sparse as sp
    from scipy.sparse.linalg import splu

    y = sp.csr_matrix(ybus)
    n = len(v)
    current = y @ v
    vnorm = v / np.abs(v)
    diag_v = sp.diags(v)
    ds_dvm = diag_v @ (y @ sp.diags(vnorm)).conj() + sp.diags(np.conj(current) * vnorm)
    ds_dva = 1j * diag_v @ (sp.diags(current) - y @ diag_v).conj()
    pq = np.array([b for b in range(n) if b != slack])
    sub = lambda m: m.tocsr()[pq][:, pq]
    jac = sp.bmat([[sub(ds_dva).real, sub(ds_dvm).real], [sub(ds_dva).imag, sub(ds_dvm).imag]], format="csc")
    pos = {b: i for i, b in enumerate(pq)}
    m = len(pq)
    k = len(buses)
    rhs = np.zeros((2 * m, 2 * k))
    for j, b in enumerate(buses):
        if int(b) in pos:
            rhs[m + pos[int(b)], j] = 1.0 / sn_mva  # reactive injection
            rhs[pos[int(b)], k + j] = 1.0 / sn_mva  # active injection
    sol = splu(jac).solve(rhs)
    dvq = np.zeros((n, k))
    dvp = np.zeros((n, k))
    dvq[pq] = sol[m:, :k]
    dvp[pq] = sol[m:, k:]
    return dvq, dvp


@dataclass
class OptimalDispatchConfig:
    iterations: int = field(default=4, metadata={"help": "linearise-solve rounds per step"})
    margin: float = field(default=0.002, metadata={"help": "p.u. kept inside the band by the LP"})
    q_weight: float = field(default=1.0, metadata={"help": "LP cost per |q|/S"})
    curtail_weight: float = field(default=10.0, metadata={"help": "LP cost per curtailed p/S"})
    violation_weight: float = field(default=1e5, metadata={"help": "LP cost per p.u. outside the band"})


class OptimalDispatch(Controller):
    """Centralised optimal reactive-power dispatch by sequential linear programming."""

    Config = OptimalDispatchConfig

    def __init__(self, env: Any, config: Any = None) -> None:
        super().__init__(env, config)
        from scenarios.grid.feeder import PowerFlow

        # Its own solver, so that planning never disturbs the env's warm start.
        self.pf = PowerFlow(env.feeder, max_iter=env.config.max_iter)
        self._ybus = self.pf.ybus
        self._q_prev: np.ndarray | None = None

    def reset(self, env: Any, seed: int | None = None) -> None:
        self.pf.reset()
        self._q_prev = None

    def act(self, observations: dict[str, np.ndarray], env: Any, messages: Any = None) -> dict[str, np.ndarray]:
        from scipy.optimize import linprog

        cfg, ec = self.config, env.config
        load_p, load_q, sgen_p = env.injections()
        agents_sg, bus = env.agent_sgens, env.agent_bus
        s = env.agent_s_mva
        p_avail = env.pv_available()
        q_max = np.sqrt(np.maximum(s**2 - p_avail**2, 0.0))
        curtail = env.action_space(env.possible_agents[0]).shape[0] == 2
        n_a, n_b = len(bus), env.feeder.n_bus
        rows = np.array([b for b in range(n_b) if b != env.feeder.slack_bus])

        def evaluate(q: np.ndarray, cut: np.ndarray) -> tuple[bool, float, float] | None:
            """AC check of a dispatch: (any bus out of band, p.u. violation, effort); None if it fails."""
            sp = sgen_p.copy()
            sp[agents_sg] = p_avail - cut
            sq = np.zeros_like(sgen_p)
            sq[agents_sg] = q
            if not self.pf.solve(load_p, load_q, sp, sq):
                return None
            v = self.pf.vm
            violation = float((np.maximum(v - ec.v_max, 0) + np.maximum(ec.v_min - v, 0)).sum())
            effort = float(np.sum(np.abs(q) / s)) * cfg.q_weight + float(np.sum(cut / s)) * cfg.curtail_weight
            return violation > 0, violation, effort

        q = np.zeros(n_a) if self._q_prev is None else np.clip(self._q_prev, -q_max, q_max)
        cut = np.zeros(n_a)
        best: tuple[tuple[bool, float, float], np.ndarray, np.ndarray] | None = None
        for round_ in range(cfg.iterations):
            score = evaluate(q, cut)
            if score is None:
                break
            # Lexicographic: in band first, then least violation, then least effort.
            if best is None or score < best[0]:
                best = (score, q.copy(), cut.copy())
            if not score[0] and round_ > 0:  # in band after an LP round: good enough
                break
            dvq, dvp = voltage_sensitivities(self._ybus, self.pf.v, env.feeder.slack_bus, bus, env.feeder.sn_mva)
            v0 = self.pf.vm[rows]
            a_q = dvq[rows]
            a_p = -dvp[rows]  # curtailment lowers the injection
            v_base = v0 - a_q @ q - (a_p @ cut if curtail else 0.0)
            m = len(rows)
            # variables: q+ (n_a), q- (n_a), [cut (n_a)], s_hi (m), s_lo (m)
            blocks_hi = [a_q, -a_q] + ([a_p] if curtail else []) + [-np.eye(m), np.zeros((m, m))]
            blocks_lo = [-a_q, a_q] + ([-a_p] if curtail else []) + [np.zeros((m, m)), -np.eye(m)]
            a_ub = np.vstack([np.hstack(blocks_hi), np.hstack(blocks_lo)])
            b_ub = np.concatenate([ec.v_max - cfg.margin - v_base, -(ec.v_min + cfg.margin) + v_base])
            c = np.concatenate(
                [cfg.q_weight / s, cfg.q_weight / s]
                + ([cfg.curtail_weight / s] if curtail else [])
                + [np.full(2 * m, cfg.violation_weight)]
            )
            bounds = (
                [(0, qm) for qm in q_max] * 2 + ([(0, pa) for pa in p_avail] if curtail else []) + [(0, None)] * (2 * m)
            )
            res = linprog(c, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
            if res.status != 0:
                break
            q_new = res.x[:n_a] - res.x[n_a : 2 * n_a]
            cut_new = res.x[2 * n_a : 3 * n_a] if curtail else cut
            if np.allclose(q_new, q, atol=1e-6) and np.allclose(cut_new, cut, atol=1e-6):
                break
            q, cut = q_new, cut_new
        else:
            score = evaluate(q, cut)  # the last LP answer has not been checked yet
            if score is not None and (best is None or score < best[0]):
                best = (score, q.copy(), cut.copy())
        q, cut = (best[1], best[2]) if best is not None else (np.zeros(n_a), np.zeros(n_a))
        self._q_prev = q
        q_room = np.sqrt(np.maximum(s**2 - (p_avail - cut) ** 2, 0.0))  # what the env scales a[0] by
        a = np.zeros((n_a, 2 if curtail else 1))
        a[:, 0] = np.clip(np.divide(q, q_room, out=np.zeros_like(q), where=q_room > 0), -1, 1)
        if curtail:
            a[:, 1] = np.clip(np.divide(cut, p_avail, out=np.zeros_like(cut), where=p_avail > 0), 0, 1)
        a = env.encode_actions(a)  # the same set-points in residual action mode
        return {agent: a[i] for i, agent in enumerate(env.possible_agents) if agent in observations}
