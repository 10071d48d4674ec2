"""Distribution feeders and their year of 15-minute profiles, plus the fast power flow.

Two things live here, both free of any RL notion:

* :func:`load_feeder` — a :class:`Feeder`: the pandapower net (SimBench feeder, or pandapower's
  ``case33bw`` with six PV units), the 35,136 quarter-hour profiles of every load and static
  generator (MW / Mvar, absolute), which static generators are the controllable inverters, and
  the bus graph with line impedances. Loading is cached per process (SimBench parsing takes
  seconds).
* :class:`PowerFlow` — a lightsim2grid model built ONCE from the net; each call to
  :meth:`PowerFlow.solve` writes the bus injections in place and runs Newton-Raphson from the
  previous solution (warm start). :func:`runpp_voltages` is the pandapower reference that tests
  and ``marl bench grid`` compare it with.

Conversion notes (measured, pandapower 3.5.6 / lightsim2grid 1.2):

* lightsim2grid's converter does not read switches. Closed bus-bus switches are fused
  (``pandapower.toolbox.fuse_buses``); an open line switch disconnects only its side of the
  line (pandapower keeps the line's charging on the other side through an auxiliary bus), so it
  becomes ``deactivate_powerline_side1/2`` in the model — dropping the whole line instead moved
  voltages by 8e-4 p.u. on 1-MV-rural.
* pandapower 3 ignores ``tap_pos`` of a transformer without ``tap_changer_type``; the converter
  does not, so such taps are set to neutral first (1-MV-urban: 1.6e-2 p.u. otherwise).
* ``pp_orig_file="pandapower_v2"`` (the default transformer formulas) matches ``runpp`` to
  1e-15 p.u. on 1-MV-rural; ``"pandapower_v3"`` was 3e-5 p.u. off.
* Newton-Raphson from a flat start fails on SimBench MV feeders (their 110/20 kV transformers
  shift the angle by 150 degrees); the model is therefore started once from pandapower's own
  solution of the base case and then warm-started from the previous step.
* Static generators are handed to lightsim2grid as negative loads, so that every step needs two
  vectorised calls (``update_loads_p`` / ``update_loads_q``) and no per-element loop. Those
  calls take float32, which rounds injections at ~1e-7 relative: measured |dV| against runpp
  stays below 3e-8 p.u. on every bus (``marl bench grid``).
"""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np

__all__ = [
    "STEPS_PER_DAY",
    "Feeder",
    "FEEDERS",
    "feeder_names",
    "load_feeder",
    "PowerFlow",
    "PandapowerFlow",
    "runpp_voltages",
    "pandapower_net_at",
    "simbench_net",
    "pv_feed_in",
    "bus_agent_graph",
    "agent_sgens",
]

#: SimBench profiles have one value every 15 minutes.
STEPS_PER_DAY = 96
#: IEEE 33-bus (Baran & Wu 1989) PV buses (0-based), one at the end of each lateral and two on the
#: main feeder, as in MAPDN's 33-bus case (Wang et al., NeurIPS 2021) which also has six PV units.
IEEE33_PV_BUSES = (12, 17, 21, 24, 28, 32)
#: SimBench load profiles (1-MV-rural's tables: aggregated LV grids, commercial, farm) given
#: round-robin to case33bw's loads.
IEEE33_LOAD_PROFILES = ("lv_rural1", "G0-A", "lv_rural2", "G3-A", "lv_semiurb4", "L0-A")
#: SimBench PV feed-in profiles (MV plants and aggregated LV rooftop PV) for the six PV units.
IEEE33_PV_PROFILES = ("PV3", "PV7", "lv_rural1", "lv_rural2", "lv_rural3", "lv_semiurb4")

#: The feeders of the registered scenarios (every name of :func:`feeder_names` works).
FEEDERS = ("1-MV-rural--0-sw", "1-LV-rural1--0-sw", "1-LV-rural2--0-sw", "1-LV-rural3--0-sw", "ieee33")


@functools.lru_cache(maxsize=1)
def feeder_names() -> tuple[str, ...]:
    """Every name :func:`load_feeder` accepts: ``ieee33`` and each SimBench MV, LV, HVMV or MVLV code.

    SimBench codes read ``1-<level>-<type>-<extension>-<scenario>-<switches>``: level ``MV``
    (20 kV: rural, semiurb, urban, comm) or ``LV`` (0.4 kV: rural1-3, semiurb4-5, urban6), or two
    levels together: ``HVMV`` (a 110 kV grid with its MV grids, their LV grids aggregated as
    ``lv_RES`` units; extension ``all`` or one MV grid such as ``2.203``) and ``MVLV`` (an MV grid
    with its LV grids in full, every rooftop PV a ``PV`` unit; about ten thousand buses); scenario 0 (today), 1 or 2 (more PV, more load); ``sw`` with switches as in the
    data, ``no_sw`` without. All share the same profile tables, so the same agents rule
    applies: every inverter-based PV sgen (types ``PV``, ``PV_MV``, ``lv_RES``) is an agent.
    """
    import simbench as sb

    codes = [c for c in sb.collect_all_simbench_codes() if c.split("-")[1] in ("MV", "LV", "HVMV", "MVLV")]
    return ("ieee33", *codes)


@dataclass(frozen=True)
class Feeder:
    """A feeder ready for simulation. Arrays are read-only; never modify ``net``.

    ``net`` has no switches left: closed bus-bus switches are fused and buses renumbered
    0..n_bus-1; ``open_line_sides`` lists (line index, side 1|2) cut by open line switches.
    Profiles are absolute: ``load_p``/``load_q`` (steps x loads, MW / Mvar) and ``sgen_p``
    (steps x sgens, MW, before any PV scaling). ``agent_sgens`` are the sgen rows that are
    controllable inverter-based PV units.
    """

    name: str
    net: Any  # pandapower net (switch-free)
    open_line_sides: tuple[tuple[int, int], ...]
    load_bus: np.ndarray
    sgen_bus: np.ndarray
    load_p: np.ndarray
    load_q: np.ndarray
    sgen_p: np.ndarray
    sgen_sn: np.ndarray  #: rated apparent power of each sgen, MVA
    agent_sgens: np.ndarray
    graph: nx.Graph  #: buses; edges carry ``r_ohm``, ``x_ohm``, ``z_ohm`` (|r + jx|)
    slack_bus: int
    sn_mva: float

    @property
    def n_bus(self) -> int:
        return len(self.net.bus)

    @property
    def n_steps(self) -> int:
        return self.load_p.shape[0]


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float64)
    a.setflags(write=False)
    return a


def _remove_switches(net: Any) -> tuple[Any, list[tuple[int, int]]]:
    """A switch-free copy of ``net`` (see the module notes) and the open line sides."""
    import pandapower.toolbox as tb

    net = copy.deepcopy(net)
    sw = net.switch
    open_sides: list[tuple[int, int]] = []
    for _, s in sw[(~sw.closed) & (sw.et == "l")].iterrows():
        line = int(s.element)
        open_sides.append((line, 1 if int(net.line.at[line, "from_bus"]) == int(s.bus) else 2))
    for _, s in sw[(~sw.closed) & (sw.et == "t")].iterrows():
        net.trafo.at[int(s.element), "in_service"] = False
    alias = {int(b): int(b) for b in net.bus.index}
    for _, s in sw[sw.closed & (sw.et == "b")].iterrows():
        keep, drop = alias[int(s.bus)], alias[int(s.element)]
        if keep != drop:
            tb.fuse_buses(net, keep, drop)
            for k, v in alias.items():
                if v == drop:
                    alias[k] = keep
    net.switch = net.switch.iloc[0:0]
    tb.create_continuous_bus_index(net)
    for table in ("sgen", "gen", "ext_grid", "load", "storage"):
        for col in ("min_p_mw", "max_p_mw", "min_q_mvar", "max_q_mvar"):
            if col in net[table]:
                net[table][col] = net[table][col].astype(float)
    if "tap_changer_type" in net.trafo:
        # pandapower 3 ignores tap_pos when a transformer has no tap_changer_type (1-MV-urban's
        # two transformers sit at tap -1 with none); lightsim2grid's converter would apply it
        # (1.6e-2 p.u. off). Put such taps at neutral so both see the same transformer.
        none = net.trafo["tap_changer_type"].isna()
        net.trafo.loc[none, "tap_pos"] = net.trafo.loc[none, "tap_neutral"]
    for table in ("load", "sgen"):  # profiles are absolute; scaling is applied by us, not pandapower
        net[table]["scaling"] = 1.0
    return net, open_sides


def _bus_graph(net: Any, open_sides: list[tuple[int, int]]) -> nx.Graph:
    """Bus graph of in-service branches; edge impedance in ohm (transformers: LV side) and in p.u.

    ``z_pu`` is on the net's ``sn_mva`` and the branch's (LV) nominal voltage, so that paths
    crossing voltage levels add up in one unit.
    """
    g = nx.Graph()
    vn = net.bus["vn_kv"].to_numpy()
    g.add_nodes_from(range(len(net.bus)))
    cut = {line for line, _ in open_sides}
    for i, row in net.line.iterrows():
        if not row.in_service or i in cut:
            continue
        r = row.r_ohm_per_km * row.length_km / row.parallel
        x = row.x_ohm_per_km * row.length_km / row.parallel
        z = float(np.hypot(r, x))
        z_pu = z / (vn[int(row.from_bus)] ** 2 / net.sn_mva)
        g.add_edge(int(row.from_bus), int(row.to_bus), r_ohm=r, x_ohm=x, z_ohm=z, z_pu=z_pu)
    for _, row in net.trafo.iterrows():
        if not row.in_service:
            continue
        z_base = row.vn_lv_kv**2 / row.sn_mva
        z = row.vk_percent / 100 * z_base
        r = row.vkr_percent / 100 * z_base
        x = float(np.sqrt(max(z * z - r * r, 0.0)))
        a, b = int(row.hv_bus), int(row.lv_bus)
        if g.has_edge(a, b):  # parallel transformers
            z_old = g.edges[a, b]["z_ohm"]
            z = z * z_old / (z + z_old)
        z_pu = z / (row.vn_lv_kv**2 / net.sn_mva)
        g.add_edge(a, b, r_ohm=r, x_ohm=x, z_ohm=float(z), z_pu=float(z_pu))
    return g


@functools.cache
def simbench_net(code: str) -> Any:
    """SimBench's own net for ``code``, parsed once per process. Shared: deep-copy before changing it."""
    import simbench as sb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sb.get_simbench_net(code)


def _simbench(code: str) -> Feeder:
    import simbench as sb

    raw = simbench_net(code)
    profiles = sb.get_absolute_values(raw, profiles_instead_of_study_cases=True)
    net, open_sides = _remove_switches(raw)
    if code.split("-")[1] == "HVMV":
        # SimBench holds its HV grids at 1.068 p.u. and gives the HV/MV transformers no tap
        # changer model (taps neutral), which leaves every MV bus above 1.05 p.u. at any load or
        # PV (measured on 1-HVMV-urban-all: 1.068-1.12 without PV control). The slack is set to
        # the MV-only codes' own set-point, 1.025 p.u., what an on-load tap changer would hold,
        # so that the MV grids start where the MV feeders do.
        net.ext_grid["vm_pu"] = 1.025
    load_p = profiles[("load", "p_mw")].to_numpy()
    load_q = profiles[("load", "q_mvar")].to_numpy()
    sgen_p = profiles[("sgen", "p_mw")].to_numpy()
    agents = agent_sgens(net)
    if agents.size == 0:
        from marl.core.errors import ConfigError

        raise ConfigError(f"bad feeder '{code}': it has no PV sgen to control (types PV, PV_MV, lv_RES)")
    return _feeder(code, net, open_sides, load_p, load_q, sgen_p, agents)


def agent_sgens(net: Any) -> np.ndarray:
    """Rows of ``net.sgen`` that are controllable inverters: SimBench types "PV" (LV, and HV
    plants in the HVMV codes), "PV_MV", and "lv_RES" (the aggregated rooftop PV of the LV grids
    under an MV bus, whose profiles are the lv_* PV profiles), with a rating above zero (the HVMV
    codes list HV PV plants of 0 MVA, which could not inject anything)."""
    types = net.sgen["type"].astype(str).to_numpy()
    rated = net.sgen["sn_mva"].to_numpy(dtype=np.float64) > 0
    return np.flatnonzero(np.isin(types, ["PV", "PV_MV", "lv_RES"]) & rated)


@functools.cache
def pv_feed_in(code: str) -> np.ndarray:
    """SimBench's normalised PV feed-in profiles of feeder ``code`` (steps x profiles, per unit of
    installed power; peak about 0.6), the ``PV*`` columns of its renewables table in name order.

    The demand-response scenario gives households rooftop PV with these profiles. Read-only.
    """
    table = simbench_net(code).profiles["renewables"]
    names = sorted(c for c in table.columns if str(c).startswith("PV"))
    if not names:
        from marl.core.errors import ConfigError

        raise ConfigError(f"bad feeder '{code}': SimBench has no PV profile for it")
    return _readonly(np.stack([table[n].to_numpy(dtype=np.float64) for n in names], axis=1))


def bus_agent_graph(feeder: Feeder, buses: np.ndarray, names: list[str], hops: int) -> nx.Graph:
    """Agents (``names[i]`` at bus ``buses[i]``) linked when their buses are within ``hops``
    branches of each other; edge ``distance`` = Σ|z| in p.u. along the feeder, ``hops`` the count."""
    g = nx.Graph()
    g.add_nodes_from(names)
    at: dict[int, list[int]] = {}
    for i, b in enumerate(buses):
        at.setdefault(int(b), []).append(i)
    for b, members in at.items():
        near = nx.single_source_shortest_path_length(feeder.graph, b, cutoff=hops)
        # Impedance paths inside the hop ball only: the same on radial feeders, and it keeps the
        # cost per agent flat on large ones (1-HVMV-urban-all, 1,343 agents, 3 hops: 19.6 s -> 0.7 s).
        dist = nx.single_source_dijkstra_path_length(feeder.graph.subgraph(near), b, weight="z_pu")
        for other, hop in near.items():
            for i in members:
                for j in at.get(int(other), []):
                    if i < j:
                        g.add_edge(names[i], names[j], distance=float(dist[other]), hops=int(hop))
    return g


def _ieee33() -> Feeder:
    """pandapower's case33bw with six PV units and SimBench profiles (the MAPDN-style task).

    Load profiles are SimBench's normalised standard profiles (peak 1) times the case's nominal
    load; PV profiles are SimBench's normalised PV feed-in (peak ~0.6 of installed capacity).
    The PV units are rated 1 MW each before the scenario's ``pv_scale``.
    """
    import pandapower as pp
    import pandapower.networks as pn

    net = pn.case33bw()
    for bus in IEEE33_PV_BUSES:
        pp.create_sgen(net, bus, p_mw=1.0, q_mvar=0.0, sn_mva=1.0, type="PV")
    net, open_sides = _remove_switches(net)
    ref = simbench_net("1-MV-rural--0-sw")  # only its normalised profile tables are read
    lp = ref.profiles["load"]
    rp = ref.profiles["renewables"]
    n_load = len(net.load)
    names = [IEEE33_LOAD_PROFILES[i % len(IEEE33_LOAD_PROFILES)] for i in range(n_load)]
    # Normalise each profile to a peak active power of 1, so the case's loads are the peak loads.
    peak = np.array([lp[f"{n}_pload"].max() for n in names])
    load_p = np.stack([lp[f"{n}_pload"].to_numpy() for n in names], axis=1) / peak * net.load["p_mw"].to_numpy()
    load_q = np.stack([lp[f"{n}_qload"].to_numpy() for n in names], axis=1) / peak * net.load["q_mvar"].to_numpy()
    pv = [IEEE33_PV_PROFILES[i % len(IEEE33_PV_PROFILES)] for i in range(len(net.sgen))]
    sgen_p = np.stack([rp[n].to_numpy() for n in pv], axis=1) * net.sgen["sn_mva"].to_numpy()
    return _feeder("ieee33", net, open_sides, load_p, load_q, sgen_p, np.arange(len(net.sgen)))


def _feeder(
    name: str,
    net: Any,
    open_sides: Any,
    load_p: np.ndarray,
    load_q: np.ndarray,
    sgen_p: np.ndarray,
    agents: np.ndarray,
) -> Feeder:
    """A :class:`Feeder` from a switch-free pandapower net and its absolute profiles (MW, Mvar)."""
    return Feeder(
        name=name,
        net=net,
        open_line_sides=tuple(open_sides),
        load_bus=net.load["bus"].to_numpy().astype(np.int64),
        sgen_bus=net.sgen["bus"].to_numpy().astype(np.int64),
        load_p=_readonly(load_p),
        load_q=_readonly(load_q),
        sgen_p=_readonly(sgen_p),
        sgen_sn=_readonly(net.sgen["sn_mva"].to_numpy()),
        agent_sgens=agents,
        graph=_bus_graph(net, open_sides),
        slack_bus=int(net.ext_grid["bus"].iloc[0]),
        sn_mva=float(net.sn_mva),
    )


@functools.cache
def load_feeder(name: str) -> Feeder:
    """The named feeder (any of :func:`feeder_names`), loaded once per process."""
    from marl.core.errors import unknown

    if name not in feeder_names():
        raise unknown("feeder", name, feeder_names())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _ieee33() if name == "ieee33" else _simbench(name)


def pandapower_net_at(
    feeder: Feeder, load_p: np.ndarray, load_q: np.ndarray, sgen_p: np.ndarray, sgen_q: np.ndarray
) -> Any:
    """A copy of the feeder's net with the given injections, open line sides as pandapower sees them.

    Open line sides are restored as open line switches so that ``runpp`` models them its own way.
    """
    import pandapower as pp

    net = copy.deepcopy(feeder.net)
    for line, side in feeder.open_line_sides:
        bus = net.line.at[line, "from_bus" if side == 1 else "to_bus"]
        pp.create_switch(net, bus, line, et="l", closed=False)
    set_injections(net, load_p, load_q, sgen_p, sgen_q)
    return net


def set_injections(net: Any, load_p: np.ndarray, load_q: np.ndarray, sgen_p: np.ndarray, sgen_q: np.ndarray) -> None:
    """Write injections into a pandapower net in place (the MAPDN way of stepping)."""
    net.load["p_mw"] = load_p
    net.load["q_mvar"] = load_q
    net.sgen["p_mw"] = sgen_p
    net.sgen["q_mvar"] = sgen_q


def runpp_voltages(net: Any, **options: Any) -> tuple[np.ndarray, float]:
    """Solve ``net`` with pandapower (the reference); (bus voltage magnitudes p.u., losses MW).

    ``numba=False``: numba is not a Concord dependency (pandapower would only warn and fall back).
    Raises ``pandapower.powerflow.LoadflowNotConverged`` when it does not converge.
    """
    import pandapower as pp

    pp.runpp(net, numba=False, **options)
    losses = float(net.res_line.pl_mw.sum() + net.res_trafo.pl_mw.sum())
    return net.res_bus.vm_pu.to_numpy().copy(), losses


class PowerFlow:
    """A lightsim2grid Newton-Raphson solver for one feeder, built once, warm-started per step.

    Loads and static generators are both loads of the model (generators negated), in the order
    ``[loads..., sgens...]``. :meth:`solve` returns True when Newton-Raphson converged; the
    voltages of the last converged solution stay in :attr:`vm` otherwise.
    """

    def __init__(self, feeder: Feeder, *, max_iter: int = 20, tol: float = 1e-10) -> None:
        import pandapower as pp
        from lightsim2grid.network import init_from_pandapower

        self.feeder = feeder
        self.max_iter = max_iter
        self.tol = tol
        net = copy.deepcopy(feeder.net)
        n_sgen = len(net.sgen)
        if n_sgen:
            for bus in net.sgen["bus"].to_numpy():
                pp.create_load(net, int(bus), p_mw=0.0, q_mvar=0.0)
            net.sgen = net.sgen.iloc[0:0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = init_from_pandapower(net)
        for line, side in feeder.open_line_sides:
            if side == 1:
                self.model.deactivate_powerline_side1(line)
            else:
                self.model.deactivate_powerline_side2(line)
        self.model.deactivate_result_computation()
        self._n_load = len(feeder.net.load)
        self._all = np.ones(self._n_load + n_sgen, dtype=bool)
        self._p = np.zeros(self._n_load + n_sgen, dtype=np.float32)
        self._q = np.zeros(self._n_load + n_sgen, dtype=np.float32)
        # Base case from pandapower: the one start point Newton-Raphson is known to converge from.
        ref = pandapower_net_at(
            feeder,
            feeder.net.load.p_mw.to_numpy(),
            feeder.net.load.q_mvar.to_numpy(),
            feeder.net.sgen.p_mw.to_numpy(),
            np.zeros(n_sgen),
        )
        pp.runpp(ref, numba=False)
        va = np.deg2rad(ref.res_bus.va_degree.to_numpy())
        self.v_base = (ref.res_bus.vm_pu.to_numpy() * np.exp(1j * va)).astype(np.complex128)
        self.v = self.v_base.copy()
        self.vm = np.abs(self.v)
        n = self._n_load
        self._p[:n], self._q[:n] = ref.load.p_mw.to_numpy(), ref.load.q_mvar.to_numpy()
        self._p[n:], self._q[n:] = -ref.sgen.p_mw.to_numpy(), 0.0
        self.model.update_loads_p(self._all, self._p)
        self.model.update_loads_q(self._all, self._q)
        if self.model.ac_pf(self.v_base, max_iter, tol).shape[0] == 0:
            raise RuntimeError(f"lightsim2grid does not reproduce pandapower's base case of {feeder.name}")
        #: bus admittance matrix (p.u. on ``sn_mva``, model bus order = the net's bus order)
        self.ybus = self.model.get_Ybus().tocsr()

    def reset(self) -> None:
        """Forget the warm start (next solve starts from the base case)."""
        self.v = self.v_base.copy()
        self.vm = np.abs(self.v)

    def solve(self, load_p: np.ndarray, load_q: np.ndarray, sgen_p: np.ndarray, sgen_q: np.ndarray) -> bool:
        """Solve with these injections (MW / Mvar); warm start, one retry from the base case."""
        n = self._n_load
        self._p[:n] = load_p
        self._p[n:] = -sgen_p
        self._q[:n] = load_q
        self._q[n:] = -sgen_q
        self.model.update_loads_p(self._all, self._p)
        self.model.update_loads_q(self._all, self._q)
        v = self.model.ac_pf(self.v, self.max_iter, self.tol)
        if v.shape[0] == 0:
            v = self.model.ac_pf(self.v_base, self.max_iter, self.tol)
        if v.shape[0] == 0 or not np.all(np.isfinite(v)):
            return False
        self.v = v
        self.vm = np.abs(v)
        return True

    def injected_p(self) -> tuple[float, np.ndarray]:
        """(losses in MW, net active injection per bus in MW) of the last solution."""
        s = self.v * np.conj(self.ybus @ self.v) * self.feeder.sn_mva
        return float(s.real.sum()), s.real

    def bus_power(self) -> np.ndarray:
        """Complex power injected at every bus (MVA, generation positive) in the last solution;
        the slack bus's entry is what the feeder draws from the grid, negated."""
        return self.v * np.conj(self.ybus @ self.v) * self.feeder.sn_mva


class PandapowerFlow:
    """The reference solver with :class:`PowerFlow`'s interface: pandapower ``runpp`` every solve.

    This is how MAPDN steps its environment (write injections into the net, call ``runpp``);
    ``marl bench grid`` and the tests run the env with it to compare speed and voltages.
    """

    def __init__(self, feeder: Feeder, *, max_iter: int = 20, tol: float = 1e-10) -> None:
        self.feeder = feeder
        self.max_iter = max_iter
        self.tol = tol
        n_sgen = len(feeder.net.sgen)
        self.net = pandapower_net_at(
            feeder,
            feeder.net.load.p_mw.to_numpy(),
            feeder.net.load.q_mvar.to_numpy(),
            feeder.net.sgen.p_mw.to_numpy(),
            np.zeros(n_sgen),
        )
        self.vm = np.ones(feeder.n_bus)
        self.losses = 0.0

    def reset(self) -> None:
        """Nothing to forget: every ``runpp`` starts from pandapower's own initial guess."""

    def solve(self, load_p: np.ndarray, load_q: np.ndarray, sgen_p: np.ndarray, sgen_q: np.ndarray) -> bool:
        from pandapower.powerflow import LoadflowNotConverged

        set_injections(self.net, load_p, load_q, sgen_p, sgen_q)
        try:
            vm, self.losses = runpp_voltages(
                self.net, max_iteration=self.max_iter, tolerance_mva=self.tol * self.feeder.sn_mva
            )
        except LoadflowNotConverged:
            return False
        self.vm = vm
        return True

    def injected_p(self) -> tuple[float, np.ndarray]:
        """(losses in MW, net active injection per bus in MW) of the last solution."""
        return self.losses, -self.net.res_bus.p_mw.to_numpy()

    def bus_power(self) -> np.ndarray:
        """Complex power injected at every bus (MVA, generation positive) in the last solution."""
        res = self.net.res_bus
        return -(res.p_mw.to_numpy() + 1j * res.q_mvar.to_numpy())
