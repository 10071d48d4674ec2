"""The grid runner behind ``marl compare``: every (method × protocol × channel × seed) cell.

A comparison lives in one directory::

    results/NAME/
      grid.json                 the plan: scenario, methods, protocols, channels, seeds, --set,
                                and the cells skipped with their reason
      cells/<key>/cell.json     one cell's settings (checked on resume: a changed setting is an error)
      cells/<key>/records.csv   that cell's rows (the usual long format, marl.results.records)
      cells/<key>/manifests/    that cell's run manifest(s)
      cells/<key>/done.json     written atomically LAST: the cell is complete
      cells/<key>/error.txt     the traceback of a failed cell (no done.json)
      records.csv, manifests/   the merged view of every finished cell (what ``marl report`` reads)
      failures.json             failed cells and their one-line errors

Only the cells listed in grid.json make up the comparison: a later compare with other settings
into the same directory leaves the earlier cells on disk, but the merged view and ``marl report``
ignore them (the command and the report's notes name them; see :func:`stale_cells`).

Resuming is the same command again: finished cells (done.json present) are skipped; an unfinished
cell's directory is wiped and the cell runs from scratch, so rows are never duplicated. The merged
``records.csv`` is rebuilt from the finished cells after every run.

Cells run in separate processes — a spawn-context pool with ``max_tasks_per_child=1`` — because
libsumo allows one simulation per process (a second one in the same process breaks the first),
and a crashing simulator then takes down only its own cell. Under MPI each rank ``r`` of ``size``
runs the cells ``i`` with ``i % size == r``, each again in its own child process.

Cells that could only repeat another cell are not run, and are listed as skipped with the reason
in ``grid.json``, in the command's output and in the report's notes:

* non-talking controllers (``ControllerSpec.uses_messages`` False) ignore what a protocol
  delivers, so protocol and channel cannot change what they do: they run ONCE per seed, with
  protocol ``none`` on a perfect channel (their row is the no-communication baseline);
* protocol ``none`` sends nothing, so the channel cannot change its result: it runs once per seed
  on a perfect channel, whatever ``--channel`` settings are given.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from marl.core import registry
from marl.core.errors import ConcordError, ConfigError
from marl.results.io import atomic_write_json, atomic_write_text

__all__ = [
    "Cell",
    "Skipped",
    "GridPlan",
    "CellOutcome",
    "plan_grid",
    "cell_key",
    "execute_cell",
    "run_grid",
    "merge_cells",
    "collect_cells",
    "write_plan",
    "canonical_channel",
    "plan_keys",
    "stale_cells",
    "CELLS_DIR",
    "DONE_FILE",
    "ERROR_FILE",
]

CELLS_DIR = "cells"
DONE_FILE = "done.json"
ERROR_FILE = "error.txt"
CELL_FILE = "cell.json"
GRID_FILE = "grid.json"
FAILURES_FILE = "failures.json"


@dataclass(frozen=True)
class Cell:
    """One unit of work: a method on a scenario with one protocol, channel and seed."""

    scenario: str
    method: str  #: controller name, or algorithm name when kind == "algo"
    kind: Literal["controller", "algo"]
    protocol: str
    channel: str  #: channel spec string; "" is a perfect channel
    seed: int
    episodes: int  #: evaluation episodes (seeds seed, seed+1, ... as in marl run)
    overrides: tuple[tuple[str, str], ...] = ()  #: --set pairs, sorted
    steps: int | None = None  #: training environment steps (algo cells)

    @property
    def key(self) -> str:
        return cell_key(self.method, self.protocol, self.channel, self.seed)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["overrides"] = dict(self.overrides)
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
            "methods": list(dict.fromkeys(c.method for c in self.cells)),
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


def cell_key(method: str, protocol: str, channel: str, seed: int) -> str:
    """A stable, readable directory name, e.g. ``max-pressure__neighbours__drop=0.3__seed1``."""
    return f"{_slug(method)}__{_slug(protocol)}__{_slug(channel) or 'perfect'}__seed{seed}"


def canonical_channel(spec: str) -> str:
    """Validate a channel spec and return its one spelling (``ChannelSpec.canonical``): sorted
    keys, defaults dropped, ``""`` for a perfect channel — so ``drop=0`` is the perfect channel
    and ``bits=8,drop=0.3`` / ``drop=0.3,bits=8`` are one cell, one key and one report row."""
    from comms.channel import parse_channel

    return parse_channel(spec).canonical()


def plan_grid(
    scenario: str,
    *,
    methods: Sequence[str],
    kind: Literal["controller", "algo"] = "controller",
    protocols: Sequence[str] = ("none",),
    channels: Sequence[str] = ("",),
    seeds: int | Sequence[int] = 3,
    episodes: int = 1,
    overrides: Mapping[str, str] | None = None,
    steps: int | None = None,
) -> GridPlan:
    """Validate every name up front (before any simulator starts) and list the cells.

    ``seeds`` is a count (seeds 0..K-1) or an explicit list. Order: method, protocol, channel,
    seed — so with several jobs the first results to appear cover every method. Channel specs
    are replaced by their canonical spelling (:func:`canonical_channel`) and deduplicated.
    """
    spec = registry.scenario_spec(scenario)
    if not methods:
        raise ConfigError("no methods to compare; give --controllers a,b or --algo NAME")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list or min(seed_list) < 0:
        raise ConfigError(f"bad --seeds {seeds!r}; expected an integer >= 1")
    if episodes < 1:
        raise ConfigError(f"bad --episodes {episodes}; expected an integer >= 1")
    for name in protocols:
        if name != "none" or "none" in registry.protocols():
            learned = registry.protocol_spec(name).learned
            if learned and kind == "controller":
                allowed = sorted(n for n, p in registry.protocols().items() if not p.learned)
                raise ConfigError(
                    f"protocol {name} is learned and needs --algo; with --controllers allowed: "
                    + ", ".join(allowed)
                )
    # Canonical spellings, deduplicated: what cells, keys and the records' channel column use.
    channels = list(dict.fromkeys(canonical_channel(text) for text in channels)) or [""]
    registry.scenario_config(scenario, overrides)  # bad --set keys fail now, with closest match
    sorted_overrides = tuple(sorted((overrides or {}).items()))

    talks: dict[str, bool] = {}
    for method in methods:
        if kind == "controller":
            talks[method] = registry.controller_spec(spec.domain, method).uses_messages
        else:
            registry.algorithm_spec(method)
            talks[method] = True  # a learned policy may use any protocol

    cells: list[Cell] = []
    skipped: list[Skipped] = []
    for method in dict.fromkeys(methods):
        combos = [(p, c) for p in dict.fromkeys(protocols) for c in dict.fromkeys(channels)]
        if not talks[method]:
            # Protocol and channel cannot change a controller that never reads messages: one run
            # per seed as the no-communication baseline; the rest are skipped with the reason.
            for p, c in combos:
                if (p, c) != ("none", ""):
                    skipped.append(
                        Skipped(method, p, c, f"controller '{method}' does not read messages; "
                                "it runs once per seed with protocol none on a perfect channel")
                    )
            combos = [("none", "")]
        elif "none" in protocols:
            # Protocol none sends nothing, so the channel cannot change the result either: one run
            # per seed on a perfect channel is the no-communication baseline of this method.
            for c in dict.fromkeys(channels):
                if c != "":
                    skipped.append(
                        Skipped(method, "none", c, "protocol none sends nothing; the channel cannot "
                                "change the result: it runs once per seed on a perfect channel")
                    )
            combos = [(p, c) for p, c in combos if p != "none"]
            combos.insert(0, ("none", ""))
        for protocol, channel in combos:
            for seed in seed_list:
                cells.append(
                    Cell(scenario, method, kind, protocol, channel, seed, episodes,
                         sorted_overrides, steps)
                )
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise ConfigError("two cells map to the same directory; check for duplicate channel specs")
    return GridPlan(scenario, cells, skipped)


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
    try:
        _PROGRESS.put_nowait((key, steps, fraction))
    except Exception:  # noqa: BLE001 - a full or closed queue must never fail a cell
        pass


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


def _run_algo_cell(cell: Cell, cell_dir: Path) -> None:
    """Train ``cell.method`` for ``cell.steps`` steps; training writes its eval records to out."""
    import dataclasses

    try:
        from marl.train import TrainRequest, train
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
        else:
            _run_algo_cell(cell, cell_dir)
    except BaseException as exc:  # noqa: BLE001 - one cell's failure must not stop the grid
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
            old = json.loads(path.read_text())
            if old != cell.to_json():
                diff = sorted(k for k in old.keys() | cell.to_json().keys()
                              if old.get(k) != cell.to_json().get(k))
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
    """Run ``cells`` (default: all of the plan) in a spawn pool of ``jobs`` one-shot processes.

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
        max_tasks_per_child=1,  # a fresh process per cell: libsumo holds one simulation per process
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
                except BaseException as exc:  # noqa: BLE001 - the child died (segfault, OOM kill)
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
    if (out / "records.csv").exists() and not (out / GRID_FILE).exists():
        raise ConfigError(
            f"{out} holds results of another command (records.csv without {GRID_FILE}); "
            "choose another --out directory for the comparison"
        )
    _check_resume(out, plan)
    atomic_write_json(out / GRID_FILE, {**plan.to_json(), "world_size": world_size})


def plan_keys(out_dir: str | os.PathLike[str]) -> list[str] | None:
    """The cell keys of the comparison recorded in ``grid.json`` (None without a grid.json)."""
    path = Path(out_dir) / GRID_FILE
    if not path.exists():
        return None
    try:
        keys = json.loads(path.read_text()).get("cells")
    except json.JSONDecodeError:
        raise ConcordError(f"{path} is not valid JSON") from None
    return None if keys is None else [str(k) for k in keys]


def _cell_dirs(out_dir: str | os.PathLike[str]) -> list[Path]:
    root = Path(out_dir) / CELLS_DIR
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def stale_cells(out_dir: str | os.PathLike[str]) -> list[str]:
    """Cell directories left from an earlier compare into the same ``--out`` (keys not in
    grid.json): ignored by :func:`merge_cells` and by ``marl report``, never deleted."""
    keys = plan_keys(out_dir)
    if keys is None:
        return []
    wanted = set(keys)
    return [d.name for d in _cell_dirs(out_dir) if d.name not in wanted]


def collect_cells(out_dir: str | os.PathLike[str]) -> tuple[list[Path], dict[str, str]]:
    """Finished cell directories (sorted by key) and failed ones as {key: last error line}.

    With a grid.json only the cells of that plan count: directories of an earlier, different
    compare into the same directory (:func:`stale_cells`) are left out.
    """
    done: list[Path] = []
    failed: dict[str, str] = {}
    keys = plan_keys(out_dir)
    wanted = None if keys is None else set(keys)
    for cell_dir in _cell_dirs(out_dir):
        if wanted is not None and cell_dir.name not in wanted:
            continue
        if (cell_dir / DONE_FILE).exists():
            done.append(cell_dir)
        elif (cell_dir / ERROR_FILE).exists():
            lines = [ln for ln in (cell_dir / ERROR_FILE).read_text().splitlines() if ln.strip()]
            failed[cell_dir.name] = lines[-1] if lines else "unknown error"
    return done, failed


def merge_cells(out_dir: str | os.PathLike[str]) -> tuple[int, int]:
    """Rebuild ``records.csv``, ``manifests/`` and ``failures.json`` from the plan's cells.

    Returns (finished cells, rows). Only finished cells of the plan in grid.json contribute,
    each exactly once; stale cells of an earlier compare (:func:`stale_cells`) and their
    manifests are left out of the merged view.
    """
    from marl.results.records import COLUMNS, MANIFEST_DIR, RECORDS_FILE

    out = Path(out_dir)
    done, failed = collect_cells(out)
    header = ",".join(COLUMNS)
    lines: list[str] = []
    manifests: set[str] = set()
    for cell_dir in done:
        path = cell_dir / RECORDS_FILE
        if not path.exists():
            continue
        text = path.read_text().splitlines()
        if not text:
            continue
        if text[0] != header:
            raise ConcordError(f"{path} has columns {text[0]!r}; expected {header!r}")
        lines.extend(ln for ln in text[1:] if ln)
        for manifest in sorted((cell_dir / MANIFEST_DIR).glob("*.json")):
            manifests.add(manifest.name)
            target = out / MANIFEST_DIR / manifest.name
            if not target.exists():
                atomic_write_text(target, manifest.read_text())
    for old in (out / MANIFEST_DIR).glob("*.json") if (out / MANIFEST_DIR).is_dir() else ():
        if old.name not in manifests:  # a manifest of a stale cell or a rerun attempt
            old.unlink()
    if lines or (out / RECORDS_FILE).exists():  # never leave rows of an earlier compare behind
        atomic_write_text(out / RECORDS_FILE, "\n".join([header, *lines]) + "\n")
    atomic_write_json(out / FAILURES_FILE, failed)
    return len(done), len(lines)
