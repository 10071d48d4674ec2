"""Traffic-signal control on SUMO: one agent per traffic light (PettingZoo ParallelEnv).

Env card
--------
**Description.** Real SUMO microsimulation (libsumo by default: a process's first episode
in-process, later ones in forked children, see Reproducibility; TraCI with
``use_libsumo=false``) of a road network whose signalised intersections are the agents. Nets and
demand come from sumo-rl's bundled ``nets`` (incl. RESCO's eight maps, Ault & Sharon 2021).

**Agents.** One per traffic light that controls at least one link and has a green phase, named
``light_<i>`` in the order of the SUMO traffic-light ids (sorted as strings); ``env.sim_ids``
maps each to its SUMO id (``{"light_0": "A0", ...}``). Records, topology, controllers and
checkpoints use the ``light_<i>`` ids; look SUMO ids up in ``sim_ids``. ``topology`` joins two lights when a road leads from one to
the other through unsignalised junctions only, within ``neighbour_max_m`` metres; edge attribute
``distance`` = metres of road between them (lengths of the lanes from one light's outgoing lane to
the other's incoming lane, inclusive; shortest path, either direction). The graph is static.

**Observation** (``Box(0, 1, (P + 1 + 2L,), float32)``, sumo-rl's default observation, padded):
one-hot of the current green phase (P = most green phases of any light), a flag "min green has
passed", then per incoming lane its density (vehicles / (length / 7.5 m)) and queue (halting
vehicles / (length / 7.5 m)), both clipped to 1; L = most incoming lanes of any light. Lights with
fewer phases or lanes are zero-padded at the end of each block.

**Sensing** (``sensing``). ``full`` (default, the observation above, bit for bit sumo-rl's):
each light sees the whole length of its incoming lanes (a few hundred metres on RESCO's maps, as
if it had a camera over every approach). ``local``: each light sees only the last ``sensing_m``
metres (default 50) before its stop line, the range of a stop-line loop or camera detector (the
RESCO/real-world setting): density and queue count only the vehicles whose front is within that
range (a vehicle whose front has crossed the stop line still counts, as in ``full``), per vehicle
space of the sensed stretch (``min(length, sensing_m) / 7.5 m``), clipped to 1. A platoon still
upstream of the range is invisible to the light it is heading for, but the upstream light has it
queued at its own stop line or just released it: that is what a neighbour's message can tell.
Phase one-hot, min-green flag, shapes, reward (a training signal computed from the whole lanes),
KPIs, ``state()`` (the concatenated observations, so local too) and the controller API below (the
classical controllers keep full sensing of their own lanes) do not change with ``sensing``.
**Approaches** (``approach_m``, default 0 = off, sumo-rl's lanes). Real nets cut a road into
short pieces just before a light (ingolstadt7: a 0.76 m incoming lane whose queue stands on the
40 m lane feeding it), and a light that counts only its controlled lanes is blind to that queue.
With ``approach_m`` > 0, each incoming lane shorter than that is extended upstream through the
lanes feeding it (``nets.approach_lanes``; RESCO's hand-written lane maps do the same) until the
approach is ``approach_m`` long or reaches another light: counts, halting and waiting time of
a lane are those of its whole approach, for observations, rewards, the ``queue`` KPI and the
controller API alike, and its capacity is the approach's length. For ``sensing=full`` only.
Costs one libsumo call per occupied lane longer than the range and two per vehicle on it, once per
decision.

**Phase clock** (``phase_clock``, default false). True appends one value to the observation
(``P + 2 + 2L``): the seconds the light has shown its current phase, yellow included, / 120,
clipped to 1, counted at decisions (in ``program`` mode from the first decision after the
programme's change). sumo-rl's observation has no clock, so a policy cannot time its phases the
way a signal programme does; ``fixed-time-actions`` as an IDQN guide needs it.

**Actions.** ``Discrete(P)``, shared by all agents: the index of the green phase to show for the
next ``delta_time`` seconds (the net's own green phases, in programme order). A change inserts
``yellow_time`` seconds of yellow (links losing green turn yellow) inside the interval; a change is
only made once the current phase has lasted ``yellow_time + min_green`` s. With ``max_green > 0``
a phase held that long is forced to the next allowed phase. **Heterogeneous lights**
(cologne3, cologne8, ingolstadt7, ingolstadt21...): ``infos[agent]["action_mask"]`` is an int8
vector of length P, 1 for the light's own phases; a masked action keeps the current phase.
``control="program"`` ignores actions and runs the net's own signal programme unchanged, so the
traffic equals a plain SUMO run. Controllers choose the mode of each episode with
``env.set_control(mode)`` right after ``reset()`` (``fixed-time`` picks ``"program"``); every
``reset()`` returns to ``control``.

**Reward** (``reward``): ``wait`` (RESCO: clip(-Σ lane waiting time / 224, -4, 4) over incoming
lanes), ``diff-waiting-time`` (sumo-rl: decrease of Σ waiting time / 100), ``queue`` (-halting
vehicles on incoming lanes), ``pressure`` (vehicles on outgoing - incoming lanes).

**KPIs** (``episode_kpis()``, from SUMO's tripinfo with unfinished and undeparted trips):
``delay`` (RESCO's average delay, s: timeLoss + departDelay per vehicle; vehicles never inserted
are charged the time from their scheduled departure to the end, SUMO's departDelay for them),
``waiting_time`` (mean per vehicle, s), ``queue`` (halting vehicles per incoming lane, averaged
over decision steps), ``throughput`` (vehicles arrived), ``teleports``, ``trips`` (vehicles
counted). ``main_kpi = "delay"``. Until the episode ends only ``queue`` so far is known.

**Episode end.** Truncation at ``end`` seconds of simulated time (``(end - begin) / delta_time``
steps); there is no termination.

**Arguments.** See :class:`Config` (``marl run traffic/grid4x4 --set end=600``).

**State** (``state()``, ``state_space``): the observations of all lights, concatenated in
``possible_agents`` order, ``Box(0, 1, (n * (P + 1 + 2L),), float32)``.

**Rendering.** None (``render_mode`` must be None; ``render()`` warns and returns None). Watch a
net with ``sumo-gui`` on the same net and route files instead.

**Copies and processes.** Each ``reset()`` of an env that has no live simulation creates its
own temporary folder (tripinfo and statistics output) and TraCI label, owned by the process
that created them; pickled, deep-copied and forked copies never share them. **libsumo holds a
single simulation per process**: a second env whose simulation is live in the same process
raises :class:`~marl.core.errors.SimulatorError`; close the first env, give the second
``use_libsumo=false`` (TraCI, a sumo process per env), or run each env in its own process
(:class:`scenarios.vector.SubprocVectorEnv`, SuperSuit's ``concat_vec_envs_v1(...,
num_cpus=K)``, RLlib's env runners).

**Reproducibility.** An episode's traffic depends only on the config and the ``reset()`` seed,
however many simulations ran before it in the process. SUMO's results depend on where its
objects lie in memory, and a second libsumo simulation in a process reuses the heap holes of the
first, whose layout varies from run to run: later libsumo episodes came out differently (other
jams and teleports). So libsumo runs only a process's first simulation in-process; each later
one runs in libsumo in a child forked from a "zygote" (``scenarios/traffic/forked.py``: a
helper process, started once per env process, that imported libsumo but never simulated), so
every simulation is a process's first: the same traffic as a fresh ``sumo`` process, at
~1.1-1.2x in-process libsumo's time (one round trip per decision carries the light states, the
steps and every value the env reads; TraCI took 1.8-4.9x). The zygote starts with the
process's second simulation (a one-episode process never starts one) and exits with the
process; each child exits when its episode closes (or the env process dies). A child that
dies mid-episode is a :class:`~marl.core.errors.SimulatorError`; ``reset()`` starts a new one.
Where ``fork`` is missing (Windows) later episodes run in a fresh ``sumo`` process over TraCI.
``fresh_sumo=false`` keeps every simulation in this process's libsumo: no helper processes, but
episodes after a process's first are not reproducible (nor are ``marl compare`` cells after a
worker's first: a worker runs several cells).

**Controller API** (what baselines may read; see ``controllers.py``): ``env.signals[agent]`` is a
:class:`~scenarios.traffic.nets.Signal` (green ``phases``, ``links``, ``in_lanes``,
``out_lanes``, ``phase_links``, ``link_in``/``link_out``); ``env.vehicles(lanes)`` and
``env.halting(lanes)`` give the current counts as float arrays; ``env.phase_pressures(agent,
measure, downstream=None)`` the pressure of each green phase (``downstream`` substitutes the
out-lane loads, e.g. with neighbours' messages); ``env.current_phase(agent)``;
``env.action_mask(agent)``; ``env.sim_time``; ``env.set_control(mode)`` / ``env.control`` (see
above). Counts are read at decision steps only.

**Version history.** v0 (2026-11): first version; lean signal logic on libsumo (sumo-rl's
``TrafficSignal`` semantics: green set, yellow transitions, default observation).
v0.1 (2026-12): ``sensing=local`` (stop-line detector range ``sensing_m``); ``full`` unchanged.
v0.2 (2026-12): ``approach_m`` (short incoming lanes extended upstream); 0 leaves v0.1 unchanged.
v0.3 (2026-12): simulations after a process's first run in a fresh sumo process (``fresh_sumo``):
later episodes are reproducible (under libsumo they depended on the process's memory history).
v0.4 (2026-12): those later simulations run in libsumo in forked children of a clean zygote
(same traffic as v0.3, at ~1.1-1.2x libsumo's time); ``use_libsumo=false`` still uses TraCI throughout.
v0.5 (2026-12): ``phase_clock`` (seconds in phase appended to the observation); false leaves v0.4 unchanged.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import tempfile
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import networkx as nx
import numpy as np
from gymnasium import spaces

from marl.core.errors import ConcordError, ConfigError, SimulatorError, unknown
from scenarios.base import Scenario
from scenarios.traffic import forked
from scenarios.traffic.nets import (
    Signal,
    approach_lanes,
    import_sumo,
    read_net,
    resolve_path,
    sumo_binary,
)

__all__ = ["Config", "TrafficSignalEnv", "parse_tripinfo", "sumo_command"]

#: Metres of lane one vehicle occupies (5 m car + 2.5 m gap, SUMO's defaults) for densities.
VEHICLE_SPACE_M = 7.5

#: Scale of the ``phase_clock`` feature, s: longer than any green of RESCO's programmes (42 s) and
#: their cycles (65-90 s), so the policy sees the whole cycle before the feature saturates.
PHASE_CLOCK_S = 120.0

#: The env whose libsumo simulation is running in this process (libsumo allows one).
_LIVE: TrafficSignalEnv | None = None
#: The process that started that simulation. A forked child inherits libsumo's live simulation
#: (and its open output files) but must not close or replace it: SUMO would write the parent's
#: tripinfo and statistics files from the child.
_LIVE_PID: int | None = None

#: Whether a libsumo simulation has already run in this process (or in the parent it was forked
#: from). SUMO's results depend on where its objects lie in memory (it orders some of them by
#: address): the first simulation in a process allocates them from fresh heap, in creation order,
#: so its results are reproducible; a later one reuses the freed holes of earlier simulations,
#: whose layout differs from run to run (address-space randomisation, and anything else the
#: process allocated meanwhile), and its traffic diverged (other jams and teleports). So only the
#: first simulation runs in-process; later ones run in forked children of a clean zygote
#: (:mod:`scenarios.traffic.forked`; unless ``fresh_sumo=false``).
_LIBSUMO_SPENT = False

#: SUMO counts a vehicle as halting below this speed, m/s (``getLastStepHaltingNumber``).
HALTING_SPEED = 0.1

#: Prefix of agent ids: ``light_<i>``.
AGENT_KIND = "light"


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class Config:
    """Parameters of a traffic-signal scenario (times in seconds of simulated time)."""

    net_file: str = field(
        default="RESCO/grid4x4/grid4x4.net.xml",
        metadata=_help("SUMO .net.xml: a path, or relative to sumo-rl's nets directory"),
    )
    route_file: str = field(
        default="RESCO/grid4x4/grid4x4_1.rou.xml",
        metadata=_help("SUMO .rou.xml demand: a path, or relative to sumo-rl's nets directory"),
    )
    begin: int = field(default=0, metadata=_help("simulation start time, s"))
    end: int = field(default=3600, metadata=_help("simulation end time (episode end), s"))
    delta_time: int = field(default=10, metadata=_help("seconds between decisions (incl. yellow)"))
    yellow_time: int = field(default=3, metadata=_help("yellow seconds inserted on a phase change"))
    min_green: int = field(default=5, metadata=_help("min green seconds before a change is allowed"))
    max_green: int = field(default=0, metadata=_help("force a change after this many s; 0 = never"))
    control: Literal["agents", "program"] = field(
        default="agents",
        metadata=_help("agents: actions pick phases; program: run the net's own signal programme"),
    )
    reward: Literal["wait", "diff-waiting-time", "queue", "pressure"] = field(
        default="wait", metadata=_help("reward per light (see the env card)")
    )
    use_libsumo: bool = field(default=True, metadata=_help("libsumo in-process; false: TraCI"))
    sumo_seed: int | None = field(default=None, metadata=_help("fixed SUMO --seed; None: the seed given to reset()"))
    neighbour_max_m: float = field(
        default=1000.0, metadata=_help("max road metres between two lights joined in topology")
    )
    sensing: Literal["full", "local"] = field(
        default="full",
        metadata=_help("full: whole incoming lanes (sumo-rl); local: only sensing_m metres before each stop line"),
    )
    sensing_m: float = field(
        default=50.0, metadata=_help("local sensing: detector range upstream of each stop line, m")
    )
    approach_m: float = field(
        default=0.0,
        metadata=_help("extend incoming lanes shorter than this upstream to an approach this long, m; 0: off"),
    )
    fresh_sumo: bool = field(
        default=True,
        metadata=_help(
            "with use_libsumo: run every simulation after the process's first in libsumo in a forked "
            "child of a clean zygote process (reproducible); false: all in this process's libsumo "
            "(no helper processes, later episodes not reproducible)"
        ),
    )
    phase_clock: bool = field(
        default=False,
        metadata=_help(
            f"append to each observation the seconds the light has shown its phase / {PHASE_CLOCK_S:.0f}, "
            "clipped to 1 (lets a policy time its phases, as a signal programme does)"
        ),
    )
    verbose: bool = field(default=False, metadata=_help("let SUMO print its console output"))

    def __post_init__(self) -> None:
        if self.end <= self.begin:
            raise ConfigError(f"bad end {self.end}; expected end > begin ({self.begin})")
        if self.delta_time < 1:
            raise ConfigError(f"bad delta_time {self.delta_time}; expected an integer >= 1")
        if not 0 <= self.yellow_time < self.delta_time:
            raise ConfigError(
                f"bad yellow_time {self.yellow_time}; expected 0 <= yellow_time < delta_time ({self.delta_time})"
            )
        if self.begin < 0:
            raise ConfigError(f"bad begin {self.begin}; expected a simulation time >= 0 s")
        if self.min_green < 0 or self.max_green < 0:
            raise ConfigError("bad min_green/max_green; expected integers >= 0")
        if not self.neighbour_max_m >= 0:
            raise ConfigError(f"bad neighbour_max_m {self.neighbour_max_m}; expected metres >= 0")
        if not 0 < self.sensing_m < float("inf"):
            raise ConfigError(f"bad sensing_m {self.sensing_m}; expected a finite range in metres > 0")
        if not 0 <= self.approach_m < float("inf"):
            raise ConfigError(f"bad approach_m {self.approach_m}; expected a finite length in metres >= 0")
        if self.approach_m > 0 and self.sensing == "local":
            raise ConfigError(
                f"bad approach_m {self.approach_m} with sensing=local; approaches extend full sensing only "
                "(add --set approach_m=0)"
            )


def sumo_command(
    net: str | Path,
    route: str | Path,
    begin: int,
    end: int,
    seed: int,
    *,
    tripinfo: str | Path | None = None,
    statistics: str | Path | None = None,
    verbose: bool = False,
    binary: str = "sumo",
) -> list[str]:
    """The SUMO command line the env uses (the benchmark's raw runs use the same one)."""
    cmd = [binary, "-n", str(net), "-r", str(route), "-b", str(begin), "-e", str(end)]
    cmd += ["--seed", str(seed)]
    if tripinfo is not None:
        cmd += [
            "--tripinfo-output", str(tripinfo),
            "--tripinfo-output.write-unfinished", "true",
            "--tripinfo-output.write-undeparted", "true",
        ]  # fmt: skip
    if statistics is not None:
        cmd += ["--statistic-output", str(statistics)]
    if verbose:
        cmd += ["--verbose", "true"]
    else:
        cmd += ["--no-step-log", "true", "--no-warnings", "true", "--duration-log.disable", "true"]
    return cmd


#: One tripinfo element's attributes in SUMO's output order (checked against a count below).
_TRIP = re.compile(
    rb'<tripinfo [^>]*?\bdepartDelay="([^"]*)"[^>]*?\barrival="([^"]*)"'
    rb'[^>]*?\bwaitingTime="([^"]*)"[^>]*?\btimeLoss="([^"]*)"'
)


def _trips(tripinfo: str | Path) -> list[tuple[bytes | str, ...]]:
    """(departDelay, arrival, waitingTime, timeLoss) of every trip.

    A regular expression over SUMO's fixed attribute order is ~30x faster than an XML parser;
    if it does not match every ``<tripinfo`` element (another SUMO version), parse the XML.
    """
    data = Path(tripinfo).read_bytes()
    rows: list[tuple[bytes | str, ...]] = _TRIP.findall(data)
    if len(rows) == data.count(b"<tripinfo "):
        return rows
    rows = []
    for _, elem in ET.iterparse(str(tripinfo), events=("end",)):
        if elem.tag == "tripinfo":
            get = elem.attrib.get
            rows.append((get("departDelay", "0"), get("arrival", "-1"), get("waitingTime", "0"),
                         get("timeLoss", "0")))  # fmt: skip
            elem.clear()
    return rows


def parse_tripinfo(tripinfo: str | Path, statistics: str | Path | None = None) -> dict[str, float]:
    """RESCO's KPIs from a tripinfo file written with unfinished and undeparted trips.

    ``delay`` = mean of timeLoss + departDelay. For a vehicle never inserted SUMO writes
    depart="-1" and departDelay = end - scheduled departure, which is what RESCO charges.
    """
    n = arrived = 0
    delay = waiting = 0.0
    for depart_delay, arrival, waiting_time, time_loss in _trips(tripinfo):
        n += 1
        delay += float(time_loss) + float(depart_delay)
        waiting += float(waiting_time)
        if float(arrival) >= 0.0:
            arrived += 1
    kpis = {
        "delay": delay / n if n else 0.0,
        "waiting_time": waiting / n if n else 0.0,
        "throughput": float(arrived),
        "trips": float(n),
    }
    if statistics is not None:
        teleports = 0.0
        for _, elem in ET.iterparse(str(statistics), events=("end",)):
            if elem.tag == "teleports":
                teleports = float(elem.attrib.get("total", 0.0))
        kpis["teleports"] = teleports
    return kpis


#: The config under a name that the class attribute ``TrafficSignalEnv.Config`` does not shadow.
TrafficConfig = Config


def _traci_lane_vars() -> tuple[int, int, int]:
    """TraCI's ids of the lane values the env reads: vehicles, halting vehicles, waiting time."""
    from traci import constants as tc

    return tc.LAST_STEP_VEHICLE_NUMBER, tc.LAST_STEP_VEHICLE_HALTING_NUMBER, tc.VAR_WAITING_TIME


def _subscribed(domain: Any, var: int) -> Callable[[str], Any]:
    """A getter of ``var`` for one object (lane, light) from the last step's TraCI reply: the
    subscribed values arrive with every step, so reading them costs no round trip to sumo."""
    results = domain.getSubscriptionResults
    return lambda obj: results(obj)[var]


class TrafficSignalEnv(Scenario):
    """SUMO traffic-signal control; see the module docstring (env card)."""

    Config = Config
    main_kpi = "delay"
    kpi_goals = {
        "delay": "min",
        "waiting_time": "min",
        "queue": "min",
        "throughput": "max",
        "teleports": "min",
        "return": "max",
    }
    metadata = {"name": "concord_traffic_v0", "render_modes": [], "is_parallelizable": True}

    # Episode state, set by _reset_counters() and _start() (declared for readers and mypy).
    _t: float  #: simulation time of the last decision, s
    _green: np.ndarray  #: green phase index shown by each light
    _since: np.ndarray  #: seconds each light has been in its phase
    _queue_sum: float
    _queue_steps: int
    _count: np.ndarray  #: vehicles per lane (+ a padding slot), sampled at decisions
    _halt: np.ndarray  #: halting vehicles per lane (+ padding)
    _wait: np.ndarray  #: waiting time per lane (+ padding), s
    _count_seen: np.ndarray  #: local sensing: vehicles per lane within the detector range
    _halt_seen: np.ndarray  #: local sensing: halting vehicles per lane within the range
    _step_to: Any  #: advances the simulation to a time (libsumo's C entry point when available)
    _get_phase: Any

    def __init__(self, config: TrafficConfig | None = None, render_mode: str | None = None) -> None:
        self.config = config if config is not None else Config()
        self._set_render_mode(render_mode)
        cfg = self.config
        self._net_path = resolve_path(cfg.net_file, "net_file")
        self._route_path = resolve_path(cfg.route_file, "route_file")
        try:
            net = read_net(str(self._net_path), float(cfg.neighbour_max_m))
        except (ET.ParseError, ValueError) as exc:
            raise ConfigError(f"bad net_file '{cfg.net_file}': not a readable SUMO net ({exc})") from None
        if not net.signals:
            raise ConfigError(f"bad net_file '{cfg.net_file}': it has no traffic lights")
        # Agent ids light_<i> in SUMO id order; the SUMO ids stay in sim_ids.
        self._sim_ids = {f"{AGENT_KIND}_{i}": tl for i, tl in enumerate(net.signals)}
        agent_of = {tl: a for a, tl in self._sim_ids.items()}
        self._roads = {(agent_of[a], agent_of[b]): d for (a, b), d in net.roads.items()}
        #: Static description of each light, keyed by agent id (see the controller API).
        self.signals: dict[str, Signal] = {a: net.signals[tl] for a, tl in self._sim_ids.items()}
        self.possible_agents = list(self.signals)
        self._agent_index = {a: i for i, a in enumerate(self.possible_agents)}
        self.agents: list[str] = []
        sigs = [self.signals[a] for a in self.possible_agents]
        self.n_max_phases = max(s.n_phases for s in sigs)
        self.n_max_lanes = max(len(s.in_lanes) for s in sigs)
        P, L = self.n_max_phases, self.n_max_lanes
        self.obs_size = P + 1 + 2 * L + int(self.config.phase_clock)
        box = spaces.Box(0.0, 1.0, (self.obs_size,), np.float32)
        self.observation_spaces = dict.fromkeys(self.possible_agents, box)
        self.action_spaces = {a: spaces.Discrete(P) for a in self.possible_agents}
        self.state_space = spaces.Box(0.0, 1.0, (len(sigs) * self.obs_size,), np.float32)

        # Lane table: incoming lanes of all lights first (sampled every decision), then lanes
        # that are only outgoing (sampled when a controller or the reward asks).
        in_lanes = list(dict.fromkeys(l for s in sigs for l in s.in_lanes))
        in_set = set(in_lanes)
        out_only = [l for l in dict.fromkeys(l for s in sigs for l in s.out_lanes) if l not in in_set]
        self._lanes = in_lanes + out_only
        self._n_in = len(in_lanes)
        self._in_lanes = tuple(in_lanes)
        self._lane_index = {l: i for i, l in enumerate(self._lanes)}
        pad = len(self._lanes)  # index of a padding slot that always holds 0
        lengths = {l: ln for s in sigs for l, ln in s.lane_length.items()}
        # Approaches: upstream lanes summed into the short incoming lane they feed (counts are
        # read lane by lane and folded in; capacities grow by the extension's length).
        extension = approach_lanes(in_lanes, net.predecessors, net.lane_length, float(cfg.approach_m))
        self._ext_lanes = tuple(l for _, l in extension)
        self._ext_owner = np.array([k for k, _ in extension], dtype=np.int64)
        for k, lane in extension:
            lengths[in_lanes[k]] = lengths.get(in_lanes[k], 0.0) + net.lane_length.get(lane, 0.0)
        self._capacity = np.array([max(lengths.get(l, 0.0) / VEHICLE_SPACE_M, 1.0) for l in self._lanes] + [1.0])
        self._in_idx = np.full((len(sigs), L), pad, dtype=np.int64)
        for i, s in enumerate(sigs):
            self._in_idx[i, : len(s.in_lanes)] = [self._lane_index[l] for l in s.in_lanes]
        self._out_idx = [np.array([self._lane_index[l] for l in s.out_lanes], dtype=np.int64) for s in sigs]
        self._n_phases = np.array([s.n_phases for s in sigs])
        self._program_to_green = [(s.id, s.program_to_green) for s in sigs]
        self._inv_capacity = 1.0 / self._capacity[self._in_idx]
        # Local sensing: the incoming lanes longer than the detector range, each with the lane
        # position (m from the lane's start) where the range begins; shorter lanes are seen whole.
        # Densities and queues are then per vehicle space of the sensed stretch, not of the lane.
        reach = float(cfg.sensing_m)
        self._local = cfg.sensing == "local"
        self._far_lanes = tuple(
            (k, l, lengths[l] - reach) for k, l in enumerate(in_lanes) if lengths.get(l, 0.0) > reach
        )
        self._far_index = np.array([k for k, _, _ in self._far_lanes], dtype=np.int64)
        sensed = [max(min(lengths.get(l, 0.0), reach) / VEHICLE_SPACE_M, 1.0) for l in self._lanes] + [1.0]
        self._inv_sensed = 1.0 / np.array(sensed)[self._in_idx]
        self._rows = np.arange(len(sigs))
        masks = {}
        for a, s in zip(self.possible_agents, sigs):
            m = np.zeros(P, dtype=np.int8)
            m[: s.n_phases] = 1
            m.flags.writeable = False
            masks[a] = m
        self._masks = masks

        # Output folder and TraCI label: made by the first _start() of the process that runs
        # the simulation (never here, so copies and forked workers never share them).
        self._tmp: Path | None = None
        self._tmp_pid = -1
        self._traci_label = ""
        self._sim: Any = None
        self._libsumo = False  #: whether the live simulation runs in this process's libsumo
        self._forked = False  #: whether it runs in libsumo in a forked child (forked.py)
        self._rng = np.random.default_rng()
        self._program_mode = cfg.control == "program"
        self._stepped = False
        self._last_kpis: dict[str, float] | None = None
        self._reset_counters()

    @property
    def sim_ids(self) -> dict[str, str]:
        """Agent id -> SUMO traffic-light id (``{"light_0": "A0", ...}``)."""
        return dict(self._sim_ids)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle/deepcopy without the live simulation, its files and its C entry points: the
        copy starts its own simulation at its first ``reset()``."""
        state = self.__dict__.copy()
        for key in ("_sim", "_get", "_step_to", "_get_phase", "_set_light"):
            state.pop(key, None)
        state.update(_sim=None, _tmp=None, _tmp_pid=-1, _traci_label="", agents=[])
        return state

    # ----------------------------------------------------------------- public controller API
    @property
    def sim_time(self) -> float:
        """Current simulation time, s."""
        return float(self._t)

    def action_mask(self, agent: str) -> np.ndarray:
        """int8 vector over ``Discrete(P)``: 1 for the light's own green phases."""
        return self._masks[agent]

    def current_phase(self, agent: str) -> int:
        """Index of the green phase the light shows (or last showed, during yellow)."""
        return int(self._green[self._agent_index[agent]])

    def vehicles(self, lanes: list[str]) -> np.ndarray:
        """Vehicles on each lane at the current decision step."""
        return self._lane_values(lanes, halting=False)

    def halting(self, lanes: list[str]) -> np.ndarray:
        """Halting vehicles (speed < 0.1 m/s) on each lane at the current decision step."""
        return self._lane_values(lanes, halting=True)

    def phase_pressures(
        self,
        agent: str,
        measure: Literal["vehicles", "halting"] = "vehicles",
        downstream: np.ndarray | None = None,
    ) -> np.ndarray:
        """Pressure of each green phase of ``agent`` (``controllers.phase_pressure``).

        ``downstream`` replaces the measured load of ``signals[agent].out_lanes`` (e.g. queues
        neighbours reported in messages).
        """
        from scenarios.traffic.controllers import phase_pressure

        signal = self.signals[agent]
        read = self.halting if measure == "halting" else self.vehicles
        down = read(signal.out_lanes) if downstream is None else downstream
        return phase_pressure(signal, read(signal.in_lanes), down)

    @property
    def control(self) -> str:
        """Who drives the lights this episode: ``"agents"`` (actions) or ``"program"``."""
        return "program" if self._program_mode else "agents"

    def set_control(self, mode: str) -> None:
        """Drive the lights of the current episode by ``mode`` (``"agents"`` or ``"program"``).

        Takes effect at once, but only between ``reset()`` and the episode's first ``step()``:
        every ``reset()`` goes back to ``config.control``, so a mode never leaks into a later
        episode (or a later controller on the same env). This works because ``reset()`` leaves
        the lights to SUMO's programme; agent mode puts phase 0 on them lazily, at the first
        step, so a ``"program"`` episode is exactly a plain SUMO run. The observation ``reset()``
        returned encodes the current phase of the mode it was reset in.
        """
        if mode not in ("agents", "program"):
            raise unknown("control mode", str(mode), ["agents", "program"])
        if self._sim is None or not self.agents or self._stepped:
            raise SimulatorError(
                f"set_control('{mode}') outside an episode's start; call it after reset() and before the first step()"
            )
        if (mode == "program") == self._program_mode:
            return
        self._program_mode = mode == "program"
        if self._program_mode:
            self._read_program_phases()
        else:
            self._green[:] = 0
        self._observe()

    @property
    def topology(self) -> nx.Graph:
        graph = nx.Graph()
        graph.add_nodes_from(self.possible_agents)
        for (a, b), dist in self._roads.items():
            graph.add_edge(a, b, distance=float(dist))
        return graph

    # ----------------------------------------------------------------- PettingZoo API
    def observation_space(self, agent: str) -> spaces.Box:
        return self.observation_spaces[agent]

    def action_space(self, agent: str) -> spaces.Discrete:
        return self.action_spaces[agent]

    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
            sumo_seed = int(seed) % (2**31 - 1)
        else:
            sumo_seed = int(self._rng.integers(2**31 - 1))
        if self.config.sumo_seed is not None:
            sumo_seed = int(self.config.sumo_seed)
        self._stop()
        self._start(sumo_seed)
        self._reset_counters()
        self._last_kpis = None
        self.agents = list(self.possible_agents)
        self._program_mode = self.config.control == "program"
        self._stepped = False
        if self._program_mode:
            self._read_program_phases()
        # agent mode: phase 0 (self._green) is put on the lights at the first step, so that a
        # controller can still switch this episode to the programme (set_control)
        self._sample()
        obs = self._observe()
        return obs, {a: {"action_mask": self._masks[a]} for a in self.agents}

    def step(
        self, actions: dict[str, Any]
    ) -> tuple[dict, dict[str, float], dict[str, bool], dict[str, bool], dict[str, dict]]:
        if self._sim is None or not self.agents:
            raise SimulatorError("step() called with no live episode; call reset() first")
        cfg = self.config
        target = min(self._t + cfg.delta_time, cfg.end)
        if self._program_mode:
            self._step_to(target)
            self._read_program_phases()
        else:
            if not self._stepped:  # no simulation step since reset: same as doing it there
                for i, a in enumerate(self.possible_agents):
                    self._set_state(a, self.signals[a].phases[int(self._green[i])])
            self._advance_agents(actions, target)
        self._stepped = True
        self._since += target - self._t
        self._t = target
        self._sample()
        obs = self._observe()
        rewards = self._rewards()
        self._queue_sum += float(self._halt[: self._n_in].sum()) / max(self._n_in, 1)
        self._queue_steps += 1
        done = self._t >= cfg.end
        agents = self.agents
        terminations = dict.fromkeys(agents, False)
        truncations = dict.fromkeys(agents, done)
        infos = {a: {"action_mask": self._masks[a]} for a in agents}
        if done:
            self._finish_episode()
            self.agents = []
        return obs, rewards, terminations, truncations, infos

    def episode_kpis(self) -> dict[str, float]:
        if self._last_kpis is not None:
            return dict(self._last_kpis)
        return {"queue": self._queue_sum / max(self._queue_steps, 1)}

    def state(self) -> np.ndarray:
        return self._obs_matrix.reshape(-1).copy()

    def close(self) -> None:
        self._stop()
        if self._tmp is not None and self._tmp_pid == os.getpid():  # never a parent's folder
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = None

    def __del__(self) -> None:  # a forgotten env must not keep the process's one simulation
        with contextlib.suppress(Exception):
            self.close()

    # ----------------------------------------------------------------- simulation
    def _start(self, seed: int) -> None:
        global _LIVE, _LIVE_PID, _LIBSUMO_SPENT
        cfg = self.config
        if cfg.use_libsumo and _LIVE_PID is not None and os.getpid() != _LIVE_PID:
            raise SimulatorError(
                "this process was forked while a traffic env's libsumo simulation was live in its "
                "parent; starting one here would write into the parent's output files: create "
                "worker processes before the first reset(), use the 'spawn' or 'forkserver' start "
                "method, or build the env with use_libsumo=false"
            )
        if cfg.use_libsumo and _LIVE is not None and _LIVE is not self:
            raise SimulatorError(
                "another traffic env's libsumo simulation is live in this process, and libsumo "
                "allows one simulation per process: close() the other env, build this one with "
                "use_libsumo=false (--set use_libsumo=false), or run each env in its own process "
                "(scenarios.vector.SubprocVectorEnv, SuperSuit concat_vec_envs_v1 with num_cpus)"
            )
        if self._tmp is None or self._tmp_pid != os.getpid():
            # this process's own folder and TraCI label (a forked copy inherits the parent's)
            self._tmp = Path(tempfile.mkdtemp(prefix="concord-sumo-"))
            self._tmp_pid = os.getpid()
            self._traci_label = f"concord-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._tripinfo = self._tmp / "tripinfo.xml"
        self._statistics = self._tmp / "statistics.xml"
        # In-process libsumo only for the process's first simulation (see _LIBSUMO_SPENT); every
        # later one in libsumo in a forked child of a clean zygote (forked.py), the same traffic
        # as a fresh sumo process; TraCI where forking is not available (or use_libsumo=false).
        later = cfg.use_libsumo and cfg.fresh_sumo and _LIBSUMO_SPENT
        self._libsumo = cfg.use_libsumo and not later
        self._forked = later and forked.available()
        module = import_sumo(self._libsumo or self._forked)
        binary = "sumo" if self._libsumo or self._forked else sumo_binary()
        cmd = sumo_command(
            self._net_path, self._route_path, cfg.begin, cfg.end, seed,
            tripinfo=self._tripinfo, statistics=self._statistics, verbose=cfg.verbose, binary=binary,
        )  # fmt: skip
        try:
            if self._forked:
                self._sim = forked.ForkedSimulation(self._episode_spec(cmd, lights=True))
            elif self._libsumo:
                module.start(cmd)
                self._sim = module
                _LIBSUMO_SPENT = True
            else:
                self._sim = self._connect_traci(module, cmd)
                self._subscribe()  # sumo reads the route file only now: its errors show here
        except forked.StartError as exc:  # libsumo's own words, as in-process
            raise self._load_error(exc) from None
        except ConcordError:
            raise
        except Exception as exc:  # libsumo raises its own TraCIException/FatalTraCIError
            sim, self._sim = self._sim, None
            if sim is not None:  # sumo answered, then stopped: close our end, report its words
                with contextlib.suppress(Exception):
                    sim.close()
                exc = SimulatorError(self._sumo_errors() or str(exc))
            raise self._load_error(exc) from None
        if cfg.use_libsumo:  # the one-simulation rule holds whichever runs it (one contract)
            _LIVE, _LIVE_PID = self, os.getpid()
        self._t = float(cfg.begin)
        if self._forked:  # writes are queued and sent with the next read (_sample)
            self._step_to, self._get_phase = self._sim.step, self._sim.phase
            self._set_light = self._sim.set_state
            return
        self._spec = self._episode_spec(cmd, lights=False)
        self._step_to = self._sim.simulationStep
        self._set_light = self._sim.trafficlight.setRedYellowGreenState
        if not self._libsumo:  # from the reply to the last step (see _subscribe)
            from traci import constants as tc

            self._get_phase = _subscribed(self._sim.trafficlight, tc.TL_CURRENT_PHASE)
        else:  # the C entry points: no Python wrapper layers (nor step listeners)
            self._get_phase = self._sim.trafficlight.getPhase
            try:
                from libsumo import _libsumo as c

                self._step_to, self._get_phase = c.simulation_step, c.trafficlight_getPhase
                self._set_light = c.trafficlight_setRedYellowGreenState
            except (ImportError, AttributeError):
                pass
        self._get = forked.Getters(*self._lane_getters(), self._get_phase, *self._position_getters())

    def _connect_traci(self, traci: Any, cmd: list[str]) -> Any:
        """Start a ``sumo`` process and connect to it over TraCI (a connection under this env's
        label).

        ``traci.start`` sleeps a whole second before its first retry while sumo opens its port,
        most of a short episode; this polls every 5 ms instead. SUMO's error output goes to a file
        (:meth:`_sumo_errors`) whose text becomes the error if sumo exits, so a rejected net or
        route file is named as with libsumo.
        """
        last: BaseException = SimulatorError("could not connect to sumo")
        for _ in range(3):  # another process may take the free port before sumo binds it
            port = traci.getFreeSocketPort()
            with open(self._errors_path(), "wb") as err:
                proc = subprocess.Popen(
                    [*cmd, "--remote-port", str(port)],
                    stdout=None if self.config.verbose else subprocess.DEVNULL,
                    stderr=None if self.config.verbose else err,
                )
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # traci prints each retry
                    return traci.connect(
                        port, numRetries=12000, proc=proc, waitBetweenRetries=0.005, label=self._traci_label
                    )
            except Exception as exc:  # sumo exited (bad input, port taken) or never answered
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                text = self._sumo_errors()
                last = SimulatorError(text or str(exc))
                port_trouble = any(word in text.lower() for word in ("port", "socket", "address already"))
                if "In file" in text or ("Error" in text and not port_trouble):
                    break  # SUMO rejected the input: another port will not help
        raise last

    def _errors_path(self) -> Path:
        """Where a TraCI sumo process writes its error output (in this env's folder)."""
        assert self._tmp is not None
        return self._tmp / "sumo-errors.txt"

    def _sumo_errors(self) -> str:
        """What the TraCI sumo process wrote to its error output, on one line."""
        with contextlib.suppress(OSError):
            return " ".join(self._errors_path().read_text(errors="replace").split())
        return ""

    def _subscribe(self) -> None:
        """TraCI: have every step's reply carry the lane counts and programme phases the env
        reads, so that reading them costs no round trip to sumo (the per-lane getters cost one
        each, several hundred per decision on a 16-light map)."""
        from traci import constants as tc

        for lane in dict.fromkeys([*self._lanes, *self._ext_lanes]):
            self._sim.lane.subscribe(lane, _traci_lane_vars())
        for tl in self._sim_ids.values():
            self._sim.trafficlight.subscribe(tl, (tc.TL_CURRENT_PHASE,))

    def _load_error(self, exc: BaseException) -> ConcordError:
        """The one-line error for SUMO refusing to start on this env's net and route files.

        SUMO was found and imported (else :func:`~scenarios.traffic.nets.import_sumo` raised,
        with the install hint), so the cause is the input: SUMO's message usually ends with
        "In file '<path>'", which tells which of the two files it rejected.
        """
        cfg = self.config
        text = str(exc)
        message = " ".join(text.split()) or type(exc).__name__
        named = re.search(r"In file '([^']*)'", text)
        if named:
            bad = Path(named.group(1))
            for key, path, given in (
                ("route_file", self._route_path, cfg.route_file),
                ("net_file", self._net_path, cfg.net_file),
            ):
                with contextlib.suppress(OSError):
                    if bad == path or bad.resolve() == Path(path).resolve():
                        # the error names the file already; keep SUMO's words and position
                        detail = " ".join(re.sub(r"\s*In file '[^']*'", ";", text).split())
                        return ConfigError(f"bad {key} '{given}': SUMO rejected it: {detail}")
        return SimulatorError(
            f"SUMO could not load net_file '{cfg.net_file}' with route_file '{cfg.route_file}': {message}"
        )

    def _lane_getters(self) -> tuple[Any, Any, Any]:
        """(vehicles, halting, waiting time) per lane; libsumo's C entry points skip a Python
        wrapper layer each, which is a third of the env's per-decision cost."""
        if self._libsumo:
            try:
                from libsumo import _libsumo as c

                return (c.lane_getLastStepVehicleNumber, c.lane_getLastStepHaltingNumber,
                        c.lane_getWaitingTime)  # fmt: skip
            except (ImportError, AttributeError):
                lane = self._sim.lane
                return lane.getLastStepVehicleNumber, lane.getLastStepHaltingNumber, lane.getWaitingTime
        vehicles, halting, waiting = (_subscribed(self._sim.lane, var) for var in _traci_lane_vars())
        return vehicles, halting, waiting

    def _position_getters(self) -> tuple[Any, Any, Any]:
        """(vehicle ids on a lane, a vehicle's front position on its lane in m, its speed in
        m/s), for local sensing; libsumo's C entry points when available, as above."""
        if self._libsumo:
            try:
                from libsumo import _libsumo as c

                return c.lane_getLastStepVehicleIDs, c.vehicle_getLanePosition, c.vehicle_getSpeed
            except (ImportError, AttributeError):
                pass
        return self._sim.lane.getLastStepVehicleIDs, self._sim.vehicle.getLanePosition, self._sim.vehicle.getSpeed

    def _stop(self, strict: bool = False) -> None:
        """Close this env's simulation (flushing SUMO's output files); idempotent. ``strict``:
        raise if a forked child died before it could write them (else a dead one is just closed)."""
        global _LIVE, _LIVE_PID
        sim, self._sim = self._sim, None
        if sim is not None and _LIVE is self and os.getpid() != _LIVE_PID:
            return  # inherited through fork: the parent's simulation, not ours to close
        if _LIVE is self:
            _LIVE, _LIVE_PID = None, None
        if sim is None:
            return
        if strict and self._forked:  # a child that died before writing SUMO's files: an error
            sim.close()
        else:
            with contextlib.suppress(Exception):  # a simulation that already died is closed too
                sim.close()

    def _finish_episode(self) -> None:
        self._stop(strict=True)  # SUMO writes unfinished trips and statistics on close
        # The zygote starts with the process's second simulation (forked.zygote, on the first
        # fork), not here: most processes of marl run / compare / bench play one episode, and
        # each would pay its start (~1 s of CPU importing libsumo) for nothing.
        kpis = parse_tripinfo(self._tripinfo, self._statistics)
        kpis["queue"] = self._queue_sum / max(self._queue_steps, 1)
        for path in (self._tripinfo, self._statistics, self._errors_path()):
            path.unlink(missing_ok=True)
        self._last_kpis = kpis

    def _reset_counters(self) -> None:
        n = len(self.possible_agents)
        self._t = float(self.config.begin)
        self._green = np.zeros(n, dtype=np.int64)
        # Start as if the current phase had lasted long enough to be changed at once.
        self._since = np.full(n, float(self.config.yellow_time + self.config.min_green))
        self._queue_sum = 0.0
        self._queue_steps = 0
        self._last_wait = np.zeros(n)
        size = len(self._lanes) + 1
        self._count = np.zeros(size)
        self._halt = np.zeros(size)
        self._wait = np.zeros(size)
        self._out_fresh = False
        self._want_out = False  # read the out lanes too (once a controller asked for them)
        self._obs_matrix = np.zeros((n, self.obs_size), dtype=np.float32)
        self._count_seen, self._halt_seen = self._count, self._halt

    def _read_program_phases(self) -> None:
        """In programme mode, the green phase each light's own programme is in (or follows)."""
        get_phase = self._get_phase
        green = [to_green[get_phase(a) % len(to_green)] for a, to_green in self._program_to_green]
        self._since[self._green != green] = 0.0  # the phase clock restarts with the programme's change
        self._green[:] = green

    def _set_state(self, agent: str, state: str) -> None:
        self._set_light(self._sim_ids[agent], state)

    def _advance_agents(self, actions: dict[str, Any], target: float) -> None:
        cfg = self.config
        switching: list[tuple[int, str, int]] = []
        for i, agent in enumerate(self.possible_agents):
            n_phases = int(self._n_phases[i])
            current = int(self._green[i])
            try:
                wanted = int(actions.get(agent, current))
            except (TypeError, ValueError):
                wanted = current
            if not 0 <= wanted < n_phases:
                wanted = current  # masked (padding) action: keep the phase, as the card says
            if wanted == current and cfg.max_green and self._since[i] >= cfg.max_green + cfg.yellow_time:
                wanted = (current + 1) % n_phases
            if wanted != current and self._since[i] >= cfg.yellow_time + cfg.min_green:
                switching.append((i, agent, wanted))
        if switching and cfg.yellow_time > 0:
            for i, agent, wanted in switching:
                self._set_state(agent, self.signals[agent].transition(int(self._green[i]), wanted))
            self._step_to(min(self._t + cfg.yellow_time, target))
        for i, agent, wanted in switching:
            self._set_state(agent, self.signals[agent].phases[wanted])
            self._green[i] = wanted
            self._since[i] = 0.0
        self._step_to(target)

    # ----------------------------------------------------------------- measurements
    def _sample(self) -> None:
        """Read the lanes once per decision, in :class:`~scenarios.traffic.forked.Reading`'s
        layout: the forked child's reply (one round trip that also runs the queued light states
        and steps), or the same :func:`~scenarios.traffic.forked.measure` call here through
        libsumo's getters (~0.3 µs each) or TraCI's subscription results."""
        if self._forked:
            values = self._sim.read()
        else:
            raw = forked.measure(self._spec, self._get, self._want_out)
            values = forked.Reading(self._spec, np.frombuffer(raw), self._want_out)
        n, m = self._n_in, len(self._lanes)
        self._count[:n] = values.count[:n]
        self._halt[:n] = values.halt[:n]
        if values.wait is not None:
            self._wait[:n] = values.wait[:n]
        if self._ext_lanes:  # the upstream lanes of each approach, after the incoming ones
            np.add.at(self._count, self._ext_owner, values.count[n:])
            np.add.at(self._halt, self._ext_owner, values.halt[n:])
            if values.wait is not None:
                np.add.at(self._wait, self._ext_owner, values.wait[n:])
        self._out_fresh = values.out_count is not None
        if self._out_fresh:
            self._count[n:m] = values.out_count
            self._halt[n:m] = values.out_halt
        if self._local:
            # What the stop-line detectors of local sensing see: each far lane's counts less the
            # vehicles whose front is farther than sensing_m from the stop line. Subtracting
            # (rather than counting the near ones) keeps SUMO's own definitions of the counts: a
            # vehicle whose front has passed the stop line but whose back is still on the lane
            # counts, as in full sensing, so a lane with nobody beyond the range reads as in full.
            self._count_seen, self._halt_seen = self._count.copy(), self._halt.copy()
            self._count_seen[self._far_index] -= values.far
            self._halt_seen[self._far_index] -= values.far_halt

    def _episode_spec(self, cmd: list[str], *, lights: bool) -> forked.EpisodeSpec:
        """What :func:`~scenarios.traffic.forked.measure` reads each decision (``lights``: also
        the programme phases, which only a forked child must send back)."""
        return forked.EpisodeSpec(
            cmd=tuple(cmd),
            lanes=self._in_lanes + self._ext_lanes,
            out_lanes=tuple(self._lanes[self._n_in :]),
            lights=tuple(self._sim_ids.values()) if lights else (),
            far=tuple(self._far_lanes) if self._local else (),
            wait=self.config.reward in ("wait", "diff-waiting-time"),
            halting_speed=HALTING_SPEED,
            errors_path=str(self._errors_path()),
            verbose=self.config.verbose,
        )

    def _sample_out(self) -> None:
        """Read the out lanes too, now and at every later decision of the episode (a controller
        that asks for them once asks every decision)."""
        if self._out_fresh or self._sim is None:
            return
        self._want_out = True
        if self._forked:
            self._sim.want_out()
        self._sample()

    def _lane_values(self, lanes: list[str], *, halting: bool) -> np.ndarray:
        idx = [self._lane_index.get(l) for l in lanes]
        if any(i is None for i in idx):
            missing = next(l for l, i in zip(lanes, idx) if i is None)
            raise ConfigError(f"unknown lane '{missing}': not controlled by or leaving any light")
        if any(i >= self._n_in for i in idx):  # type: ignore[operator]
            self._sample_out()
        values = self._halt if halting else self._count
        return values[np.asarray(idx, dtype=np.int64)]

    def _observe(self) -> dict[str, np.ndarray]:
        P, L = self.n_max_phases, self.n_max_lanes
        obs = self._obs_matrix = np.zeros((len(self.possible_agents), self.obs_size), np.float32)
        obs[self._rows, self._green] = 1.0
        obs[:, P] = self._since >= self.config.yellow_time + self.config.min_green
        if self._local:
            count, halt, inv = self._count_seen, self._halt_seen, self._inv_sensed
        else:
            count, halt, inv = self._count, self._halt, self._inv_capacity
        np.minimum(count[self._in_idx] * inv, 1.0, out=obs[:, P + 1 : P + 1 + L], casting="unsafe")
        np.minimum(halt[self._in_idx] * inv, 1.0, out=obs[:, P + 1 + L : P + 1 + 2 * L], casting="unsafe")
        if self.config.phase_clock:
            np.minimum(self._since / PHASE_CLOCK_S, 1.0, out=obs[:, -1], casting="unsafe")
        return dict(zip(self.agents, obs))

    def _rewards(self) -> dict[str, float]:
        kind = self.config.reward
        if kind == "wait":
            total = self._wait[self._in_idx].sum(axis=1)
            values = np.maximum(total * (-1.0 / 224.0), -4.0)  # clip(-Σwait/224, -4, 4)
        elif kind == "diff-waiting-time":
            total = self._wait[self._in_idx].sum(axis=1) / 100.0
            values, self._last_wait = self._last_wait - total, total
        elif kind == "queue":
            values = -self._halt[self._in_idx].sum(axis=1)
        else:  # pressure: vehicles leaving minus vehicles approaching (sumo-rl)
            self._sample_out()
            incoming = self._count[self._in_idx].sum(axis=1)
            values = np.array([self._count[o].sum() for o in self._out_idx]) - incoming
        return dict(zip(self.agents, values.tolist()))
