"""The grid runner behind ``marl compare``: every (method × protocol × channel × seed) cell.

The directory layout of a comparison, and the merged view ``marl report`` reads, are described
in :mod:`marl.results.cells`, which reads and writes that data; this module plans the grid and
runs its cells.

Resuming is the same command again: finished cells (done.json present) are skipped; an unfinished
cell's directory is wiped and the cell runs from scratch, so rows are never duplicated. The merged
``records.csv`` is rebuilt from the finished cells after every run.

Cells run in a spawn-context pool of ``--jobs`` worker processes, never in the parent: a huge or
crashing simulation cannot take the grid's bookkeeping down with it. A worker runs one cell after
another, so each pays Python's, torch's and the simulator's imports once (``make demo``'s 60
grid4x4 cells with ``--jobs 2``: 0.60-0.70 of the time with a fresh process per cell, e.g. 67 s
instead of 112 s, the same records). That is safe for traffic because a traffic env plays only its process's first simulation in libsumo
itself and every later one in a child forked from a clean zygote (``scenarios/traffic/forked.py``):
a cell's episodes equal a fresh process's whichever cells the worker ran before
(``tests/test_compare.py``). Under MPI each rank ``r`` of ``size`` runs the cells ``i`` with
``i % size == r`` in its own pool.

Cells that could only repeat another cell are not run, and are listed as skipped with the reason
in ``grid.json``, in the command's output and in the report's notes:

* non-talking controllers (``ControllerSpec.uses_messages`` False) ignore what a protocol
  delivers, so protocol and channel cannot change what they do: they run ONCE per seed, with
  protocol ``none`` on a perfect channel (their row is the no-communication baseline);
* protocol ``none`` sends nothing, so the channel cannot change its result: it runs once per seed
  on a perfect channel, whatever ``--channel`` settings are given.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from marl.core import registry
from marl.core.errors import ConcordError, ConfigError
from marl.results.cells import CELL_FILE, CELLS_DIR, DONE_FILE, ERROR_FILE, GRID_FILE
from marl.results.io import atomic_write_json, atomic_write_text
from marl.results.records import RECORDS_FILE

if TYPE_CHECKING:  # annotations only: the CLI parses channel specs, this module trusts them
    from comms.channel import ChannelSpec

__all__ = [
    "Cell",
    "Skipped",
    "GridPlan",
    "CellOutcome",
    "plan_grid",
    "cell_key",
    "setting_label",
    "algo_settings",
    "execute_cell",
    "run_grid",
    "write_plan",
    "preflight",
    "MAX_SEEDS",
    "MAX_CELLS",
]


#: Most seeds per setting: more than any confidence interval needs (IQM CIs start at 5).
MAX_SEEDS = 1000
#: Most cells in one comparison: a directory each, and every one a simulator run.
MAX_CELLS = 10_000


@dataclass(frozen=True)
class Cell:
    """One unit of work: a method on a scenario with one protocol, channel and seed."""

    scenario: str
    method: str  #: controller name, algorithm name when kind == "algo", the user's name when "policy"
    kind: Literal["controller", "algo", "policy"]
    protocol: str
    channel: str  #: channel spec string; "" is a perfect channel
    seed: int
    episodes: int  #: evaluation episodes (seeds seed, seed+1, ... as in marl run)
    overrides: tuple[tuple[str, str], ...] = ()  #: --set pairs, sorted
    steps: int | None = None  #: training environment steps (algo cells)
    algo_overrides: tuple[tuple[str, str], ...] = ()  #: --algo-set pairs of this setting, sorted (algo cells)
    policy: str = ""  #: checkpoint file of a trained policy (policy cells)

    @property
    def label(self) -> str:
        """The method as reports show it: ``ippo``, or with its setting ``ippo[learning_rate=1e-3]``."""
        return setting_label(self.method, self.algo_overrides)

    @property
    def key(self) -> str:
        return cell_key(self.label, self.protocol, self.channel, self.seed)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["overrides"] = dict(self.overrides)
        data["algo_overrides"] = dict(self.algo_overrides)
        if not self.policy:  # cells of other kinds keep the cell.json they had before policies existed
            del data["policy"]
        return data


@dataclass(frozen=True)
class Skipped:
    method: str
    protocol: str
    channel: str
    reason: str


@dataclass
class GridPlan:
    scenario: str
    cells: list[Cell]
    skipped: list[Skipped] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "methods": list(dict.fromkeys(c.label for c in self.cells)),
            "protocols": list(dict.fromkeys([c.protocol for c in self.cells] + [s.protocol for s in self.skipped])),
            "channels": list(dict.fromkeys([c.channel for c in self.cells] + [s.channel for s in self.skipped])),
            "seeds": sorted({c.seed for c in self.cells}),
            "cells": [c.key for c in self.cells],
            "skipped": [asdict(s) for s in self.skipped],
        }


@dataclass
class CellOutcome:
    key: str
    status: Literal["done", "skipped", "failed"]  #: skipped: already finished in an earlier run
    seconds: float = 0.0
    error: str = ""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text).strip("_")


def setting_label(method: str, settings: Iterable[tuple[str, str]]) -> str:
    """``ippo`` or ``ippo[learning_rate=1e-3,num_steps=256]`` (keys sorted)."""
    pairs = sorted(settings)
    return method + ("[" + ",".join(f"{k}={v}" for k, v in pairs) + "]" if pairs else "")


def algo_settings(
    algos: Sequence[str], axes: Mapping[str, Sequence[str]]
) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every (algorithm, --algo-set setting) of a sweep: the product of the ``axes`` values
    (``{"learning_rate": ["3e-4", "1e-3"]}``) for each algorithm, each setting checked against the
    algorithm's typed config now, so a bad key or value fails before any cell trains."""
    from marl.training import algorithm_config

    keys = sorted(axes)
    for key in keys:
        if not axes[key]:
            raise ConfigError(f"bad --algo-set {key}=: give one or more comma-separated values")
    settings = []
    for algo in dict.fromkeys(algos):
        registry.algorithm_spec(algo)
        for values in itertools.product(*(dict.fromkeys(axes[k]) for k in keys)):
            pairs = tuple(zip(keys, values))
            algorithm_config(algo, dict(pairs))  # ConfigError naming the key or value and the allowed ones
            settings.append((algo, pairs))
    return settings


def cell_key(method: str, protocol: str, channel: str, seed: int) -> str:
    """A stable, readable directory name, e.g. ``max-pressure__neighbours__drop=0.3__seed1``."""
    return f"{_slug(method)}__{_slug(protocol)}__{_slug(channel) or 'perfect'}__seed{seed}"


def plan_grid(
    scenario: str,
    *,
    methods: Sequence[str],
    kind: Literal["controller", "algo"] = "controller",
    protocols: Sequence[str] = ("none",),
    channels: Sequence[ChannelSpec] = (),
    seeds: int | Sequence[int] = 3,
    episodes: int = 1,
    overrides: Mapping[str, str] | None = None,
    steps: int | None = None,
    algo_axes: Mapping[str, Sequence[str]] | None = None,
    policies: Mapping[str, str] | None = None,
) -> GridPlan:
    """Validate every name up front (before any simulator starts) and list the cells.

    ``seeds`` is a count (seeds 0..K-1) or an explicit list. Order: method, protocol, channel,
    seed — so with several jobs the first results to appear cover every method.

    ``channels`` are parsed specs (``comms.channel.parse_channel`` at the CLI); cells, keys and
    the records' channel column use their canonical spelling (``ChannelSpec.canonical``: sorted
    keys, defaults dropped, ``""`` for a perfect channel), so ``drop=0`` is the perfect channel
    and ``bits=8,drop=0.3`` / ``drop=0.3,bits=8`` are one cell, one key and one report row.
    No channels means the perfect channel alone.

    With ``kind="algo"``, ``methods`` are algorithms and ``algo_axes`` their hyper-parameter grid
    (``--algo-set learning_rate=3e-4,1e-3``): every algorithm × setting is a method of its own,
    labelled ``ippo[learning_rate=1e-3]`` in keys, records and reports.

    ``policies`` (``{name: checkpoint}``, ``--policy NAME=PATH``) adds trained policies beside the
    controllers, scored on the same episodes: each talks through the protocol it was trained with
    (its cells' protocol, whatever ``protocols`` says), under every channel setting when it talks.
    """
    registry.scenario_spec(scenario)  # an unknown scenario fails first, with the closest match
    trained = _policy_protocols(policies or {}, methods if kind == "controller" else ())
    if not methods and not trained:
        raise ConfigError("no methods to compare; give --controllers a,b or --algo NAME")
    if isinstance(seeds, int) and not 1 <= seeds <= MAX_SEEDS:
        raise ConfigError(f"bad --seeds {seeds}; allowed: 1..{MAX_SEEDS}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list or min(seed_list) < 0:
        raise ConfigError(f"bad --seeds {seeds!r}; expected seeds >= 0")
    if episodes < 1:
        raise ConfigError(f"bad --episodes {episodes}; expected an integer >= 1")
    for name in protocols:
        if name != "none" or "none" in registry.protocols():
            learned = registry.protocol_spec(name).learned
            if learned and kind == "controller":
                allowed = sorted(n for n, p in registry.protocols().items() if not p.learned)
                raise ConfigError(
                    f"protocol {name} is learned and needs --algo; with --controllers allowed: " + ", ".join(allowed)
                )
    # Canonical spellings, deduplicated: what cells, keys and the records' channel column use.
    channel_texts = list(dict.fromkeys(spec.canonical() for spec in channels)) or [""]
    registry.scenario_config(scenario, overrides)  # bad --set keys fail now, with closest match
    sorted_overrides = tuple(sorted((overrides or {}).items()))

    talks: dict[str, bool] = {}
    settings: list[tuple[str, tuple[tuple[str, str], ...]]]
    if kind == "controller":
        if algo_axes:
            raise ConfigError("--algo-set needs --algo; controllers take --controller-set in marl run")
        settings = [(m, ()) for m in dict.fromkeys(methods)]
        for method in methods:
            talks[method] = registry.scenario_controller(scenario, method).uses_messages
        # Trained policies: their own protocol; as for any method, "none" needs one perfect channel.
        settings += [(name, ()) for name in trained]
        talks.update(dict.fromkeys(trained, True))  # a silent one is handled as protocol none below
    else:
        settings = algo_settings(methods, algo_axes or {})
        talks.update(dict.fromkeys(methods, True))  # a learned policy may use any protocol

    cells: list[Cell] = []
    skipped: list[Skipped] = []
    for method, setting in settings:
        method_protocols = [trained[method]] if method in trained else list(dict.fromkeys(protocols))
        combos = [(p, c) for p in method_protocols for c in dict.fromkeys(channel_texts)]
        if not talks[method]:
            # Protocol and channel cannot change a controller that never reads messages: one run
            # per seed as the no-communication baseline; the rest are skipped with the reason.
            for p, c in combos:
                if (p, c) != ("none", ""):
                    skipped.append(
                        Skipped(
                            method,
                            p,
                            c,
                            f"controller '{method}' does not read messages; "
                            "it runs once per seed with protocol none on a perfect channel",
                        )
                    )
            combos = [("none", "")]
        elif "none" in method_protocols:
            # Protocol none sends nothing, so the channel cannot change the result either: one run
            # per seed on a perfect channel is the no-communication baseline of this method.
            for c in dict.fromkeys(channel_texts):
                if c != "":
                    skipped.append(
                        Skipped(
                            method,
                            "none",
                            c,
                            "protocol none sends nothing; the channel cannot "
                            "change the result: it runs once per seed on a perfect channel",
                        )
                    )
            combos = [(p, c) for p, c in combos if p != "none"]
            combos.insert(0, ("none", ""))
        for protocol, channel in combos:
            for seed in seed_list:
                if method in trained:
                    cells.append(
                        Cell(scenario, method, "policy", protocol, channel, seed, episodes, sorted_overrides,
                             policy=str((policies or {})[method]))
                    )  # fmt: skip
                    continue
                cells.append(
                    Cell(scenario, method, kind, protocol, channel, seed, episodes, sorted_overrides, steps, setting)
                )
    if len(cells) > MAX_CELLS:
        raise ConfigError(
            f"the grid has {len(cells)} cells; allowed: at most {MAX_CELLS} in one compare "
            "(fewer seeds, methods, protocols or channel settings)"
        )
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise ConfigError("two cells map to the same directory; check for duplicate channel specs")
    return GridPlan(scenario, cells, skipped)


def _policy_protocols(policies: Mapping[str, str], controllers: Sequence[str]) -> dict[str, str]:
    """Each trained policy's protocol, read from its checkpoint's metadata (weights only, checked),
    so a missing or foreign file fails before any cell runs; names must be new method names."""
    from marl.training import load_checkpoint

    protocols = {}
    for name, path in policies.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
            raise ConfigError(f"bad --policy name {name!r}; allowed: letters, digits and _ . + - (e.g. idqn-full)")
        if name in controllers:
            raise ConfigError(f"bad --policy name {name!r}: it is also a controller; give the policy another name")
        protocols[name] = str(load_checkpoint(path)["meta"]["protocol"])
    return protocols


def _preflight_child(scenario: str, overrides: dict[str, str], channels: list[ChannelSpec]) -> None:
    """Build the scenario, reset it once and check crash ids against its agents (child process)."""
    env = registry.make_scenario(scenario, overrides)
    try:
        env.reset(seed=0)
        agents = list(env.possible_agents)
        if any(isinstance(spec.crash, tuple) for spec in channels):
            from comms.channel import Channel

            for spec in channels:
                Channel(agents, spec)  # unknown crash ids raise a ConcordError naming them
    finally:
        env.close()


def preflight(scenario: str, overrides: Mapping[str, str], channels: Sequence[ChannelSpec] = ()) -> None:
    """Check the scenario's inputs (map, net and route files, ``--set`` values, crash ids) once,
    before any cell starts, as ``marl run`` does: a bad input is then one ConcordError (exit 2)
    instead of the same failure in every cell.

    Runs in a fresh spawned process, like the cells: libsumo holds one simulation per process, and
    a huge or broken input must not grow the parent that will run the grid.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from marl.core.errors import SimulatorError

    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pool.submit(_preflight_child, scenario, dict(overrides), list(channels)).result()
    except BrokenProcessPool:
        raise SimulatorError(
            f"{scenario} died while starting (killed, or out of memory) before any cell ran; check its --set values"
        ) from None


# --------------------------------------------------------------------------------------------
# One cell (runs in a child process)


def _inject_failure(cell: Cell, pattern: str) -> None:
    """Test hook (hidden --inject-failure): cells whose key matches the regex raise."""
    if pattern and re.search(pattern, cell.key):
        raise RuntimeError(f"injected failure in cell {cell.key} (--inject-failure {pattern!r})")


#: Set in each pool worker by _init_worker: a queue the parent reads for live progress.
_PROGRESS: Any = None
#: Report a running cell's step count every this many environment steps.
_STEP_EVERY = 50


def _init_worker(queue: Any) -> None:
    global _PROGRESS
    _PROGRESS = queue


def _report(key: str, steps: int | None = None, fraction: float | None = None) -> None:
    """Tell the parent how far a cell is (never blocks; progress is best-effort)."""
    if _PROGRESS is None:
        return
    with contextlib.suppress(Exception):
        _PROGRESS.put_nowait((key, steps, fraction))


def _run_controller_cell(cell: Cell, cell_dir: Path) -> None:
    from marl.runner import RunRequest, run

    done_steps = [0, 0]  # steps of finished episodes, steps of the current one

    def on_step(n: int) -> None:
        done_steps[1] = n
        if n % _STEP_EVERY == 0:
            _report(cell.key, steps=sum(done_steps))

    def on_episode(i: int, _: Any) -> None:
        done_steps[0] += done_steps[1]
        done_steps[1] = 0
        _report(cell.key, steps=done_steps[0], fraction=(i + 1) / cell.episodes)

    run(
        RunRequest(
            scenario=cell.scenario,
            controller=cell.method,
            episodes=cell.episodes,
            seed=cell.seed,
            out=str(cell_dir),
            overrides=dict(cell.overrides),
            protocol=cell.protocol,
            channel=cell.channel,
        ),
        on_step=on_step,
        on_episode=on_episode,
    )


def _run_policy_cell(cell: Cell, cell_dir: Path) -> None:
    """Score a trained policy as ``marl run --policy`` does, then name its rows after the cell."""
    from marl.results.records import RecordWriter
    from marl.runner import RunRequest, run

    def on_episode(i: int, _: Any) -> None:
        _report(cell.key, fraction=(i + 1) / cell.episodes)

    run(
        RunRequest(
            scenario=cell.scenario,
            policy=cell.policy,
            episodes=cell.episodes,
            seed=cell.seed,
            out=str(cell_dir),
            overrides=dict(cell.overrides),
            channel=cell.channel,
        ),
        on_episode=on_episode,
    )
    # Before done.json exists, so an interrupted rewrite is redone with the whole cell.
    RecordWriter(cell_dir).relabel(lambda _method: cell.method)


def _run_algo_cell(cell: Cell, cell_dir: Path) -> None:
    """Train ``cell.method`` for ``cell.steps`` steps; training writes its eval records to out."""
    import dataclasses

    try:
        from marl.training import TrainRequest, train
    except ModuleNotFoundError as exc:
        raise ConcordError(f"training is not available ({exc}); compare controllers instead") from None
    wanted = {
        "scenario": cell.scenario,
        "algo": cell.method,
        "algorithm": cell.method,
        "steps": cell.steps,
        "total_steps": cell.steps,
        "seed": cell.seed,
        "protocol": cell.protocol,
        "channel": cell.channel,
        "overrides": dict(cell.overrides),
        "algo_overrides": dict(cell.algo_overrides),
        "out": str(cell_dir),
        "eval_episodes": cell.episodes,
    }
    names = {f.name for f in dataclasses.fields(TrainRequest)}

    def on_progress(info: dict[str, Any]) -> None:
        total = float(info.get("total_steps") or 0)
        steps = int(info.get("env_steps") or 0)
        _report(cell.key, steps=steps, fraction=min(steps / total, 1.0) if total else None)

    train(
        TrainRequest(**{k: v for k, v in wanted.items() if k in names and v is not None}),
        on_progress=on_progress,
    )
    if cell.algo_overrides:
        _relabel(cell_dir, cell.method, cell.label)


def _relabel(cell_dir: Path, algo: str, label: str) -> None:
    """Name the setting in the cell's rows: training writes ``ippo`` (or ``ippo+tarmac``); two
    settings of one algorithm must be two methods in the report, ``ippo[learning_rate=1e-3]``.
    Runs before done.json exists, so an interrupted rewrite is redone with the whole cell."""
    from marl.results.records import RecordWriter

    RecordWriter(cell_dir).relabel(lambda method: label + method[len(algo) :] if method.startswith(algo) else method)


def execute_cell(cell: Cell, out_dir: str, inject_failure: str = "") -> CellOutcome:
    """Run one cell into ``out_dir/cells/<key>``; never raises (a failure is an outcome).

    A finished cell is skipped. An unfinished one is wiped first, so a rerun never appends to
    rows from an interrupted attempt. ``done.json`` is written atomically after everything else.
    """
    cell_dir = Path(out_dir) / CELLS_DIR / cell.key
    if (cell_dir / DONE_FILE).exists():
        return CellOutcome(cell.key, "skipped")
    if cell_dir.exists():
        shutil.rmtree(cell_dir)
    cell_dir.mkdir(parents=True)
    atomic_write_json(cell_dir / CELL_FILE, cell.to_json())
    start = time.perf_counter()
    try:
        _inject_failure(cell, inject_failure)
        if cell.kind == "controller":
            _run_controller_cell(cell, cell_dir)
        elif cell.kind == "policy":
            _run_policy_cell(cell, cell_dir)
        else:
            _run_algo_cell(cell, cell_dir)
    except BaseException as exc:
        atomic_write_text(cell_dir / ERROR_FILE, traceback.format_exc())
        line = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
        return CellOutcome(cell.key, "failed", time.perf_counter() - start, line)
    seconds = time.perf_counter() - start
    atomic_write_json(cell_dir / DONE_FILE, {"key": cell.key, "seconds": seconds, "pid": os.getpid()})
    return CellOutcome(cell.key, "done", seconds)


# --------------------------------------------------------------------------------------------
# The grid


def _check_resume(out: Path, plan: GridPlan) -> None:
    """A finished cell made with other settings (episodes, --set, steps) must not be reused."""
    for cell in plan.cells:
        path = out / CELLS_DIR / cell.key / CELL_FILE
        if (out / CELLS_DIR / cell.key / DONE_FILE).exists() and path.exists():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                raise ConfigError(f"{path} is not readable JSON; delete that cell directory to rerun it") from None
            if old != cell.to_json():
                diff = sorted(k for k in old.keys() | cell.to_json().keys() if old.get(k) != cell.to_json().get(k))
                raise ConfigError(
                    f"{out} already holds cell {cell.key} made with different {', '.join(diff)}; "
                    "use another --out directory or the same settings"
                )


def run_grid(
    plan: GridPlan,
    out_dir: str | os.PathLike[str],
    *,
    jobs: int = 1,
    cells: Iterable[Cell] | None = None,
    inject_failure: str = "",
    on_outcome: Callable[[CellOutcome], None] | None = None,
    on_progress: Callable[[str, int | None, float | None], None] | None = None,
) -> list[CellOutcome]:
    """Run ``cells`` (default: all of the plan) in a spawn pool of ``jobs`` worker processes.

    ``on_outcome`` is called as each cell ends; ``on_progress(key, env_steps, fraction)`` with live
    progress of running cells (either value may be None when unknown).
    """
    import multiprocessing
    import queue as queue_module
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    out = Path(out_dir)
    todo = list(plan.cells if cells is None else cells)
    outcomes: list[CellOutcome] = []
    pending = []
    for cell in todo:
        if (out / CELLS_DIR / cell.key / DONE_FILE).exists():
            outcome = CellOutcome(cell.key, "skipped")
            outcomes.append(outcome)
            if on_outcome:
                on_outcome(outcome)
        else:
            pending.append(cell)
    if not pending:
        return outcomes
    context = multiprocessing.get_context("spawn")
    # A plain queue reaches the workers through the initializer (inherited at process start);
    # it cannot travel as a task argument.
    progress: Any = context.Queue()

    def drain() -> None:
        while True:
            try:
                key, steps, fraction = progress.get_nowait()
            except queue_module.Empty:
                return
            if on_progress:
                on_progress(key, steps, fraction)

    with ProcessPoolExecutor(
        max_workers=max(1, min(jobs, len(pending))),
        mp_context=context,
        initializer=_init_worker,
        initargs=(progress,),
    ) as pool:
        futures = {pool.submit(execute_cell, cell, str(out), inject_failure): cell for cell in pending}
        running = set(futures)
        while running:
            finished, running = wait(running, timeout=0.25, return_when=FIRST_COMPLETED)
            drain()
            for future in finished:
                cell = futures[future]
                try:
                    outcome = future.result()
                except BaseException as exc:
                    outcome = CellOutcome(cell.key, "failed", 0.0, f"worker process died: {exc!r}")
                    cell_dir = out / CELLS_DIR / cell.key
                    if cell_dir.is_dir():
                        atomic_write_text(cell_dir / ERROR_FILE, outcome.error + "\n")
                outcomes.append(outcome)
                if on_outcome:
                    on_outcome(outcome)
    drain()
    progress.close()
    return outcomes


def write_plan(plan: GridPlan, out_dir: str | os.PathLike[str], *, world_size: int = 1) -> None:
    """Check a resumed directory against the plan, then record the plan in grid.json."""
    out = Path(out_dir)
    if (out / RECORDS_FILE).exists() and not (out / GRID_FILE).exists():
        raise ConfigError(
            f"{out} holds results of another command ({RECORDS_FILE} without {GRID_FILE}); "
            "choose another --out directory for the comparison"
        )
    _check_resume(out, plan)
    atomic_write_json(out / GRID_FILE, {**plan.to_json(), "world_size": world_size})
