"""SUMO set-up and static network facts for the traffic scenarios (no simulator needed).

* :func:`sumo_home` / :func:`import_sumo` — find SUMO from the ``eclipse-sumo`` wheel and import
  ``libsumo`` or ``traci``; a missing or broken SUMO becomes a one-line
  :class:`~marl.core.errors.SimulatorError` that says how to install it.
* :func:`resolve_path` — net and route files are given as paths, absolute or relative to
  sumo-rl's ``nets`` directory (``RESCO/grid4x4/grid4x4.net.xml``). sumo-rl is located without
  importing it (its import needs ``SUMO_HOME`` and pulls in PettingZoo wrappers we do not use).
* :func:`read_net` — parses a ``.net.xml`` once (cached) into :class:`Signal` records: the green
  phases of each traffic light, its controlled links in ``linkIndex`` order, incoming/outgoing
  lanes and their lengths, and the road graph between traffic lights. Everything here is what
  ``trafficlight.getControlledLinks`` / ``getAllProgramLogics`` would say, read from the file so
  that an env can describe its agents and spaces before any simulation starts.
"""

from __future__ import annotations

import heapq
import importlib.util
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from marl.core.errors import ConfigError, SimulatorError

__all__ = [
    "Signal",
    "NetInfo",
    "sumo_home",
    "sumo_binary",
    "import_sumo",
    "sumo_rl_nets_dir",
    "resolve_path",
    "read_net",
    "INSTALL_HINT",
]

INSTALL_HINT = "install SUMO with `pip install eclipse-sumo libsumo` (or set SUMO_HOME)"


def sumo_home() -> str:
    """SUMO_HOME: the environment variable if set, else the eclipse-sumo wheel's directory.

    The variable is exported when unset, because sumo-rl (and SUMO's tools) read it at import.
    """
    home = os.environ.get("SUMO_HOME")
    if home:
        return home
    try:
        import sumo  # the eclipse-sumo wheel
    except ImportError:
        raise SimulatorError(f"SUMO is not installed; {INSTALL_HINT}") from None
    home = str(sumo.SUMO_HOME)
    os.environ["SUMO_HOME"] = home
    return home


def sumo_binary() -> str:
    """Path of the ``sumo`` executable (TraCI mode and the benchmark's reference runs)."""
    exe = Path(sumo_home()) / "bin" / ("sumo.exe" if os.name == "nt" else "sumo")
    if not exe.exists():
        raise SimulatorError(f"no sumo executable at {exe}; {INSTALL_HINT}")
    return str(exe)


def import_sumo(use_libsumo: bool) -> ModuleType:
    """``libsumo`` (in-process, fast) or ``traci`` (socket to a sumo process)."""
    sumo_home()
    name = "libsumo" if use_libsumo else "traci"
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise SimulatorError(f"cannot import {name} ({exc}); {INSTALL_HINT}") from None


def sumo_rl_nets_dir() -> Path:
    """sumo-rl's bundled ``nets`` directory, found without importing sumo_rl."""
    spec = importlib.util.find_spec("sumo_rl")
    if spec is None or not spec.submodule_search_locations:
        raise SimulatorError("sumo-rl is not installed (its nets are needed); pip install sumo-rl")
    return Path(next(iter(spec.submodule_search_locations))) / "nets"


def resolve_path(path: str, what: str) -> Path:
    """An existing file: ``path`` itself, or ``path`` under sumo-rl's nets directory."""
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return candidate.resolve()
    bundled = sumo_rl_nets_dir() / path
    if bundled.is_file():
        return bundled
    raise ConfigError(f"bad {what} '{path}': no such file (nor under sumo-rl's nets, {sumo_rl_nets_dir()})")


@dataclass
class Signal:
    """One traffic light, as controllers see it (static facts; live counts come from the env).

    ``phases`` are the green phases of the net's own programme, in programme order (a phase is
    green when it has no 'y' and is not all red). Action ``k`` selects ``phases[k]``.
    ``links[i] = (in_lane, out_lane)`` for controlled link ``i`` (SUMO's linkIndex);
    ``link_in[i]``/``link_out[i]`` index ``in_lanes``/``out_lanes``; ``phase_links[k, i]`` is True
    when phase ``k`` gives link ``i`` green ('G' or 'g').
    """

    id: str
    phases: list[str]
    program: list[tuple[str, float]]  #: the net's full programme: (state, duration s)
    links: list[tuple[str, str]]
    in_lanes: list[str]
    out_lanes: list[str]
    link_in: np.ndarray
    link_out: np.ndarray
    phase_links: np.ndarray
    lane_length: dict[str, float] = field(repr=False)
    #: programme phase index -> green phase index shown in observations (yellow/red map to the
    #: green phase they follow).
    program_to_green: list[int] = field(repr=False, default_factory=list)

    @property
    def n_phases(self) -> int:
        return len(self.phases)

    def transition(self, src: int, dst: int) -> str:
        """The yellow state between green phases ``src`` and ``dst``: links that lose green go 'y'."""
        a, b = self.phases[src], self.phases[dst]
        return "".join("y" if x in "Gg" and y in "rs" else x for x, y in zip(a, b))


@dataclass
class NetInfo:
    """Signals of a net (sorted by id) and road distances between them."""

    signals: dict[str, Signal]
    #: (tl_a, tl_b) -> metres of road from a's outgoing lane to the end of b's incoming lane.
    roads: dict[tuple[str, str], float]


def _is_green(state: str) -> bool:
    return "y" not in state and any(c in "Gg" for c in state)


@lru_cache(maxsize=16)
def read_net(net_file: str, max_road_m: float = 1000.0) -> NetInfo:
    """Parse a SUMO net (see the module docstring); cached per file."""
    import xml.etree.ElementTree as ET

    lane_length: dict[str, float] = {}
    programs: dict[str, list[tuple[str, float]]] = {}
    tl_links: dict[str, dict[int, tuple[str, str]]] = {}
    successors: dict[str, set[str]] = {}
    for _, elem in ET.iterparse(net_file, events=("end",)):
        tag = elem.tag
        if tag == "lane":
            lane_length[elem.get("id", "")] = float(elem.get("length", "0"))
        elif tag == "tlLogic":
            tl = elem.get("id", "")
            if tl not in programs:  # SUMO starts the first programme of each light
                programs[tl] = [(p.get("state", ""), float(p.get("duration", "0"))) for p in elem.iter("phase")]
            elem.clear()
        elif tag == "connection":
            src, dst = elem.get("from", ""), elem.get("to", "")
            if src.startswith(":"):
                continue  # internal lanes: the road graph uses normal lanes only
            in_lane = f"{src}_{elem.get('fromLane')}"
            out_lane = f"{dst}_{elem.get('toLane')}"
            successors.setdefault(in_lane, set()).add(out_lane)
            tl = elem.get("tl")
            if tl is not None:
                tl_links.setdefault(tl, {})[int(elem.get("linkIndex", "-1"))] = (in_lane, out_lane)
        elif tag == "edge":
            elem.clear()

    signals: dict[str, Signal] = {}
    for tl in sorted(programs):
        program = programs[tl]
        phases = [s for s, _ in program if _is_green(s)]
        by_index = tl_links.get(tl, {})
        if not phases or not by_index:
            continue  # a programme that controls nothing is no agent
        n_links = len(program[0][0])
        links = [by_index.get(i, ("", "")) for i in range(n_links)]
        in_lanes = list(dict.fromkeys(a for a, _ in links if a))
        out_lanes = list(dict.fromkeys(b for _, b in links if b))
        link_in = np.array([in_lanes.index(a) if a else -1 for a, _ in links], dtype=np.int64)
        link_out = np.array([out_lanes.index(b) if b else -1 for _, b in links], dtype=np.int64)
        phase_links = np.array([[c in "Gg" and links[i][0] != "" for i, c in enumerate(s)] for s in phases], dtype=bool)
        to_green, last = [], 0
        for state, _ in program:
            if _is_green(state):
                last = phases.index(state)
            to_green.append(last)
        signals[tl] = Signal(
            id=tl,
            phases=phases,
            program=program,
            links=links,
            in_lanes=in_lanes,
            out_lanes=out_lanes,
            link_in=link_in,
            link_out=link_out,
            phase_links=phase_links,
            lane_length={l: lane_length.get(l, 0.0) for l in in_lanes + out_lanes},
            program_to_green=to_green,
        )

    # Road graph between lights: shortest lane path from a light's outgoing lane to another
    # light's incoming lane, through uncontrolled junctions, up to max_road_m of road.
    owner = {lane: tl for tl, s in signals.items() for lane in s.in_lanes}
    roads: dict[tuple[str, str], float] = {}
    for tl, sig in signals.items():
        frontier = [(lane_length.get(l, 0.0), l) for l in sig.out_lanes]
        heapq.heapify(frontier)
        seen: set[str] = set()
        while frontier:
            dist, lane = heapq.heappop(frontier)
            if lane in seen or dist > max_road_m:
                continue
            seen.add(lane)
            other = owner.get(lane)
            if other is not None:
                if other != tl:
                    key = (min(tl, other), max(tl, other))
                    roads[key] = min(roads.get(key, float("inf")), dist)
                continue  # stop at the first light on the way
            for nxt in successors.get(lane, ()):
                heapq.heappush(frontier, (dist + lane_length.get(nxt, 0.0), nxt))
    return NetInfo(signals=signals, roads=roads)


def describe(info: NetInfo) -> dict[str, Any]:
    """Small summary for debugging: lights, phases and lanes per light."""
    return {tl: (s.n_phases, len(s.in_lanes)) for tl, s in info.signals.items()}
