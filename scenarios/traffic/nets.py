"""SUMO set-up and static network facts for the traffic scenarios (no simulator needed).

* :func:`sumo_home` / :func:`import_sumo` — find SUMO from the ``eclipse-sumo`` wheel and import
  ``libsumo`` or ``traci``; a missing or broken SUMO becomes a one-line
  :class:`~marl.core.errors.SimulatorError` that says how to install it.
* :func:`resolve_path` — net and route files are given as paths, absolute or relative to
  sumo-rl's ``nets`` directory (``RESCO/grid4x4/grid4x4.net.xml``), or as generated nets
  (``generated/grid10x10-seed0/grid.net.xml``, see below). sumo-rl is located without
  importing it (its import needs ``SUMO_HOME`` and pulls in PettingZoo wrappers we do not use).
* :func:`build_grid` — city-sized synthetic grids made with SUMO's own tools (``netgenerate``,
  then ``randomTrips.py`` + ``duarouter`` for the demand) at first use, cached under
  :func:`cache_dir` and reproducible from a seed (see :class:`GridRecipe`).
* :func:`read_net` — parses a ``.net.xml`` once (cached) into :class:`Signal` records: the green
  phases of each traffic light, its controlled links in ``linkIndex`` order, incoming/outgoing
  lanes and their lengths, and the road graph between traffic lights. Everything here is what
  ``trafficlight.getControlledLinks`` / ``getAllProgramLogics`` would say, read from the file so
  that an env can describe its agents and spaces before any simulation starts.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
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
    "approach_lanes",
    "INSTALL_HINT",
    "GridRecipe",
    "build_grid",
    "cache_dir",
    "GENERATED_PREFIX",
]

INSTALL_HINT = "install SUMO with `pip install eclipse-sumo libsumo` (or set SUMO_HOME)"


def sumo_home() -> str:
    """SUMO's home with its executables (``bin/``) and tools: the SUMO_HOME variable if it has
    them, else the eclipse-sumo wheel's directory.

    Importing libsumo sets SUMO_HOME to its sumo-data wheel, which holds SUMO's data files but no
    executables or tools; the eclipse-sumo wheel beside it is the same SUMO and is used then. The
    variable is exported when unset, because sumo-rl (and SUMO's tools) read it at import.
    """
    home = os.environ.get("SUMO_HOME")
    if home and (Path(home) / "bin").is_dir():
        return home
    try:
        import sumo  # the eclipse-sumo wheel
    except ImportError:
        if home:
            return home  # a SUMO_HOME without bin/: the caller names the missing file
        raise SimulatorError(f"SUMO is not installed; {INSTALL_HINT}") from None
    wheel = str(sumo.SUMO_HOME)
    if not home:
        os.environ["SUMO_HOME"] = wheel
    return wheel


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
    """An existing file: ``path`` itself, a generated net's file (built and cached at first use,
    see :func:`resolve_generated`), or ``path`` under sumo-rl's nets directory."""
    if path.startswith(GENERATED_PREFIX):
        return resolve_generated(path, what)
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return candidate.resolve()
    bundled = sumo_rl_nets_dir() / path
    if bundled.is_file():
        return bundled
    raise ConfigError(f"bad {what} '{path}': no such file (nor under sumo-rl's nets, {sumo_rl_nets_dir()})")


#: Net and route paths that start with this are generated nets (:func:`resolve_generated`).
GENERATED_PREFIX = "generated/"
#: Version of the grid recipe (tool options, demand model). It is part of the cache path, so a
#: changed recipe never reads nets built by an older one.
GRID_RECIPE_VERSION = 2
#: The files of a generated grid's directory that a user may name.
GRID_FILES = ("grid.net.xml", "grid.rou.xml")
_GRID_NAME = re.compile(r"grid(\d+)x(\d+)-seed(\d+)")


def cache_dir() -> Path:
    """Where Concord caches generated data: ``$CONCORD_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/concord``, else ``~/.cache/concord`` (the XDG default)."""
    own = os.environ.get("CONCORD_CACHE_DIR")
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "concord"


@dataclass(frozen=True)
class GridRecipe:
    """A synthetic ``rows`` x ``cols`` grid of signalised intersections and its demand.

    Net (``netgenerate --grid``): blocks of ``block_m`` metres, ``lanes`` lanes per direction,
    13.89 m/s (50 km/h), every inner junction a static traffic light with netgenerate's
    two-phase programme (north-south, east-west; lefts permissive, 42 s green + 3 s yellow), and
    a dead-end stub of ``block_m`` on every fringe junction, so there are exactly rows x cols
    lights. Demand (``randomTrips.py`` with ``duarouter``): one vehicle per
    ``3600 / (veh_per_light_hour * rows * cols)`` s for ``hours`` h, between random edges
    ``min_trip_m`` to ``max_trip_m`` apart (straight line; fringe edges weighted
    ``fringe_factor`` times), shortest-time routes. Trips are local, as in a city, not across
    it: their length does not grow with the grid, so vehicles per intersection (and SUMO's cost
    per light) stay the same at every size once the net has filled (~5 min). ``seed`` seeds
    randomTrips (origins, destinations); the net itself has no randomness. Same recipe -> same
    files (up to SUMO's header comments, which hold a date).
    """

    rows: int
    cols: int
    seed: int = 0
    block_m: float = 200.0
    lanes: int = 2
    veh_per_light_hour: float = 50.0
    hours: float = 1.0
    fringe_factor: float = 1.0
    min_trip_m: float = 400.0
    max_trip_m: float = 2000.0

    def __post_init__(self) -> None:
        if self.rows < 2 or self.cols < 2:
            raise ConfigError(f"bad grid size {self.rows}x{self.cols}; expected at least 2x2 intersections")
        if self.seed < 0:
            raise ConfigError(f"bad grid seed {self.seed}; expected an integer >= 0")

    @property
    def name(self) -> str:
        """Directory name and the ``generated/<name>/`` path segment: ``grid10x10-seed0``."""
        return f"grid{self.rows}x{self.cols}-seed{self.seed}"

    @property
    def period_s(self) -> float:
        """Seconds between two departures (randomTrips' ``--period``)."""
        return 3600.0 / (self.veh_per_light_hour * self.rows * self.cols)


def grid_dir(recipe: GridRecipe, root: Path | None = None) -> Path:
    """The cache directory of ``recipe`` (it exists once :func:`build_grid` has finished)."""
    base = cache_dir() if root is None else root
    return base / "traffic" / f"v{GRID_RECIPE_VERSION}" / recipe.name


def _run_tool(cmd: list[str], what: str, cwd: Path) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SimulatorError(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}")


def build_grid(recipe: GridRecipe, root: Path | None = None) -> Path:
    """The directory holding ``grid.net.xml`` and ``grid.rou.xml`` of ``recipe``, built first
    if it is not cached (under ``root``, default :func:`cache_dir`).

    Built atomically: the tools write into a fresh temporary directory beside the final one,
    which is then renamed into place. Two processes building the same recipe at once both build;
    the first rename wins and the other process drops its copy and uses the winner's, so a
    reader never sees a half-written net. Measured: ~5 s for 10x10, ~26 s for 20x20 (mostly
    duarouter routing 20000 trips) on a shared 2-core machine.
    """
    final = grid_dir(recipe, root)
    if final.is_dir():
        return final
    home = Path(sumo_home())
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{recipe.name}-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        net, rou = tmp / GRID_FILES[0], tmp / GRID_FILES[1]
        exe = "netgenerate.exe" if os.name == "nt" else "netgenerate"
        # Relative output names with cwd=tmp: SUMO's header comments then hold no temp path.
        _run_tool(
            [
                str(home / "bin" / exe), "--grid",
                "--grid.x-number", str(recipe.cols), "--grid.y-number", str(recipe.rows),
                "--grid.length", str(recipe.block_m), "--grid.attach-length", str(recipe.block_m),
                "--default-junction-type", "traffic_light", "--tls.default-type", "static",
                "--default.lanenumber", str(recipe.lanes), "--default.speed", "13.89",
                "--no-turnarounds", "true", "--no-warnings", "true", "--seed", "0",
                "--output-file", net.name,
            ],
            "netgenerate",
            tmp,
        )  # fmt: skip
        # randomTrips runs in its own process (it is a script, and it calls duarouter itself).
        cmd = [
            sys.executable, str(home / "tools" / "randomTrips.py"),
            "-n", net.name, "-o", "trips.xml", "-r", rou.name,
            "-s", str(recipe.seed), "-b", "0", "-e", str(round(3600 * recipe.hours)),
            "-p", f"{recipe.period_s:.6g}", "--fringe-factor", f"{recipe.fringe_factor:g}",
            "--min-distance", f"{recipe.min_trip_m:g}", "--max-distance", f"{recipe.max_trip_m:g}",
            "--validate",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env={**os.environ, "SUMO_HOME": str(home)})
        if proc.returncode != 0 or not rou.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise SimulatorError(f"randomTrips.py failed (exit {proc.returncode}): {' | '.join(tail)}")
        for extra in tmp.iterdir():  # trips and duarouter's alternatives are not needed
            if extra.name not in GRID_FILES:
                extra.unlink()
        (tmp / "recipe.json").write_text(
            json.dumps({"version": GRID_RECIPE_VERSION, **dataclasses.asdict(recipe)}, indent=1)
        )
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def parse_generated(path: str, what: str = "generated net path") -> tuple[GridRecipe, str]:
    """``generated/grid<R>x<C>-seed<S>/<file>`` -> (recipe, file); a ConfigError otherwise."""
    parts = path[len(GENERATED_PREFIX) :].split("/")
    match = _GRID_NAME.fullmatch(parts[0]) if len(parts) == 2 else None
    if match is None or parts[1] not in GRID_FILES:
        raise ConfigError(
            f"bad {what} '{path}'; expected {GENERATED_PREFIX}grid<rows>x<cols>-seed<seed>/"
            f"{{{','.join(GRID_FILES)}}}, e.g. {GENERATED_PREFIX}grid10x10-seed0/grid.net.xml"
        )
    rows, cols, seed = (int(g) for g in match.groups())
    try:
        return GridRecipe(rows, cols, seed), parts[1]
    except ConfigError as exc:
        raise ConfigError(f"bad {what} '{path}': {str(exc).removeprefix('bad ')}") from None


def resolve_generated(path: str, what: str) -> Path:
    """The file a ``generated/...`` path names, building (and caching) its net at first use."""
    recipe, name = parse_generated(path, what)
    return build_grid(recipe) / name


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
    #: the programme's ``offset``, s: SUMO delays every phase by it (phase at t: (t - offset) mod cycle).
    offset: float = 0.0

    @property
    def n_phases(self) -> int:
        return len(self.phases)

    @cached_property
    def _program_ends(self) -> list[float]:
        """End of each programme phase within the cycle, s (cumulative durations)."""
        return list(itertools.accumulate(d for _, d in self.program))

    @cached_property
    def _program_next_green(self) -> list[int]:
        """Per programme phase: the green phase it shows or, if yellow or red, changes to."""
        states = [state for state, _ in self.program]
        n = len(states)
        # a Signal has at least one green phase, so every search ends
        return [self.phases.index(next(s for s in states[i:] + states[:i] if _is_green(s))) for i in range(n)]

    def program_index_at(self, t: float) -> int:
        """Index into ``program`` of the phase SUMO's programme runs at simulation time ``t``, s."""
        ends = self._program_ends
        cycle = ends[-1]
        pos = (t - self.offset) % cycle if cycle > 0 else 0.0
        return min(bisect.bisect_right(ends, pos), len(ends) - 1)  # pos == cycle up to rounding: last

    def program_next_green(self, t: float) -> int:
        """The green phase (action) the programme shows at ``t``, or, during its yellow or red,
        the green it is changing to."""
        return self._program_next_green[self.program_index_at(t)]

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
    #: lane -> the normal lanes that feed it through a connection (internal lanes and U-turns skipped).
    predecessors: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    #: every normal lane's length, m.
    lane_length: dict[str, float] = field(default_factory=dict, repr=False)


def _is_green(state: str) -> bool:
    return "y" not in state and any(c in "Gg" for c in state)


@lru_cache(maxsize=16)
def read_net(net_file: str, max_road_m: float = 1000.0) -> NetInfo:
    """Parse a SUMO net (see the module docstring); cached per file."""
    import xml.etree.ElementTree as ET

    lane_length: dict[str, float] = {}
    programs: dict[str, list[tuple[str, float]]] = {}
    offsets: dict[str, float] = {}
    tl_links: dict[str, dict[int, tuple[str, str]]] = {}
    successors: dict[str, set[str]] = {}
    feeds: dict[str, set[str]] = {}  # lane -> lanes feeding it, U-turns left out
    for _, elem in ET.iterparse(net_file, events=("end",)):
        tag = elem.tag
        if tag == "lane":
            lane_length[elem.get("id", "")] = float(elem.get("length", "0"))
        elif tag == "tlLogic":
            tl = elem.get("id", "")
            if tl not in programs:  # SUMO starts the first programme of each light
                programs[tl] = [(p.get("state", ""), float(p.get("duration", "0"))) for p in elem.iter("phase")]
                offsets[tl] = float(elem.get("offset", "0"))
            elem.clear()
        elif tag == "connection":
            src, dst = elem.get("from", ""), elem.get("to", "")
            if src.startswith(":"):
                continue  # internal lanes: the road graph uses normal lanes only
            in_lane = f"{src}_{elem.get('fromLane')}"
            out_lane = f"{dst}_{elem.get('toLane')}"
            successors.setdefault(in_lane, set()).add(out_lane)
            if elem.get("dir") != "t":  # a U-turn feeds the lane from the opposite direction
                feeds.setdefault(out_lane, set()).add(in_lane)
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
            offset=offsets.get(tl, 0.0),
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
    return NetInfo(
        signals=signals,
        roads=roads,
        predecessors={l: tuple(sorted(p)) for l, p in feeds.items()},
        lane_length={l: n for l, n in lane_length.items() if not l.startswith(":")},
    )


def approach_lanes(
    in_lanes: list[str], predecessors: dict[str, tuple[str, ...]], lane_length: dict[str, float], approach_m: float
) -> list[tuple[int, str]]:
    """Upstream lanes that extend each short incoming lane into an approach of ``approach_m`` m.

    Real nets cut roads into short pieces just before a light (ingolstadt7 has a 0.76 m
    incoming lane whose queue stands on the 40 m lane before it), so a light that counts only
    its own incoming lanes is blind to that queue. Each incoming lane shorter than
    ``approach_m`` takes the lanes feeding it, level by level, until the approach is long
    enough (it grows by the longest lane of each level) or the road meets another light's
    incoming lane. A lane joins at most one approach (no vehicle is counted twice). Returns
    ``(k, lane)`` pairs: ``lane`` belongs to the approach of ``in_lanes[k]``. Without short lanes
    (or ``approach_m`` 0) the list is empty.
    """
    claimed = set(in_lanes)
    extension: list[tuple[int, str]] = []
    for k, lane in enumerate(in_lanes):
        reach = lane_length.get(lane, 0.0)
        level = [lane]
        while reach < approach_m and level:
            upstream = sorted({p for l in level for p in predecessors.get(l, ()) if p not in claimed})
            claimed.update(upstream)
            extension += [(k, p) for p in upstream]
            reach += max((lane_length.get(p, 0.0) for p in upstream), default=0.0)
            level = upstream
    return extension


def describe(info: NetInfo) -> dict[str, Any]:
    """Small summary for debugging: lights, phases and lanes per light."""
    return {tl: (s.n_phases, len(s.in_lanes)) for tl, s in info.signals.items()}
