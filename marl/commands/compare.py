"""``marl compare``: run a grid of methods × protocols × channel settings × seeds on a scenario.

Examples::

    marl compare traffic/grid4x4 --controllers max-pressure-coordinated,max-pressure \\
        --protocols none,neighbours,broadcast --channel drop=0 --channel drop=0.3 \\
        --seeds 3 --set end=900 --jobs 2 --out results/demo
    marl compare warehouse/small --algo ippo --steps 20000 --protocols none,neighbours \\
        --seeds 3 --ranks 2 --out results/ippo-comms
    marl compare traffic/grid4x4 --algo ippo,idqn --algo-set learning_rate=3e-4,1e-3 \\
        --steps 36000 --seeds 3 --episodes 3 --jobs 2 --out results/sweep   # 4 settings x 3 seeds
    marl compare traffic/grid4x4 --controllers max-pressure \
        --policy idqn=results/reference/checkpoints/grid4x4-full-idqn.pt \
        --channel drop=0 --channel drop=0.3 --seeds 3 --out results/learned   # trained beside rules

Cells run in --jobs worker processes and each writes its own directory, so the command is resumable:
run it again and only unfinished cells run. A failed cell is recorded (cells/<key>/error.txt,
failures.json) and the others go on; the exit code is then 1. Bad input — a name, a value, a map
or route file the scenario cannot load, an --out that cannot be written, more --jobs or --ranks
than the machine holds — is refused with exit code 2 before any cell starts. See
marl/results/cells.py for the directory layout and marl/compare.py for how non-talking
controllers are handled.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from marl.options import channels_option, out_option, set_option

if TYPE_CHECKING:  # only for annotations: keep `marl --help` free of these imports
    from rich.console import Console

    from marl.compare import Cell, GridPlan

__all__ = ["command"]

_MAX_FAILURES_SHOWN = 5
#: Environment variables an MPI launcher sets (marl.distributed.launch.under_launcher has the full rule).
_LAUNCHER_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "CONCORD_MPI_LAUNCHED")


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("scenario")
@click.option("--controllers", default=None, help="Comma-separated controllers to compare.")
@click.option(
    "--algo",
    default=None,
    help="Comma-separated learning algorithms to train in every cell (instead of --controllers).",
)
@click.option(
    "--algo-set",
    "algo_set",
    multiple=True,
    metavar="KEY=V1,V2",
    help="A hyper-parameter axis of the sweep (repeatable): every combination of the values is a setting.",
)
@click.option(
    "--policy",
    "policies",
    multiple=True,
    metavar="NAME=PATH",
    help="A trained policy (a 'marl train' checkpoint) scored beside the controllers on the same episodes, "
    "under its own protocol and every --channel (repeatable).",
)
@click.option("--steps", type=int, default=None, help="Training steps per cell (with --algo).")
@click.option("--protocols", default="none", help="Comma-separated protocols (see 'marl list protocols').")
@channels_option
@click.option("--seeds", type=int, default=3, help="Number of seeds per cell setting (seeds 0..K-1).")
@click.option("--episodes", type=int, default=1, help="Evaluation episodes per cell.")
@click.option("--jobs", type=int, default=None, help="Parallel processes; default: number of CPUs.")
@click.option("--ranks", type=int, default=1, help="Spread cells over N MPI ranks (relaunches under mpiexec).")
@click.option(
    "--oversubscribe", is_flag=True, help="Allow more --ranks/--jobs than 4 per core (up to what memory holds)."
)
@set_option
@out_option("Results directory, e.g. results/NAME (rerun to resume).", required=True)
@click.option("--inject-failure", default="", hidden=True, help="Regex: cells whose key matches fail (tests).")
def command(
    scenario: str,
    controllers: str | None,
    algo: str | None,
    algo_set: tuple[str, ...],
    policies: tuple[str, ...],
    steps: int | None,
    protocols: str,
    channels: tuple[str, ...],
    seeds: int,
    episodes: int,
    jobs: int | None,
    ranks: int,
    oversubscribe: bool,
    set_: tuple[str, ...],
    out: str,
    inject_failure: str,
) -> int:
    """Run every (method, protocol, channel, seed) cell of SCENARIO, in parallel and resumably,
    into OUT; then 'marl report OUT' makes the tables and figures."""
    from rich.console import Console

    from comms.channel import parse_channel
    from marl.compare import plan_grid, preflight, write_plan
    from marl.core.config import check_local_processes, parse_sets
    from marl.core.errors import ConfigError
    from marl.results.records import check_out_dir, make_out_dir

    # emoji=False: user values such as a cell key or error text with ":x:" must print verbatim.
    err = Console(stderr=True, highlight=False, emoji=False)
    # Every check below runs before any cell, simulator or MPI launcher starts (exit code 2).
    if (controllers is None and not policies) == (algo is None):
        raise ConfigError("give --controllers a,b and/or --policy NAME=PATH, or --algo NAME (not both kinds)")
    if algo is not None and (steps is None or steps < 1):
        raise ConfigError(f"bad --steps {steps}; --algo needs --steps N with N >= 1")
    if jobs is not None and jobs < 1:
        raise ConfigError(f"bad --jobs {jobs}; expected an integer >= 1")
    if jobs is not None:
        check_local_processes("--jobs", jobs, oversubscribe=oversubscribe)
    if ranks < 1:
        raise ConfigError(f"bad --ranks {ranks}; expected an integer >= 1")
    launched = any(v in os.environ for v in _LAUNCHER_MARKERS)
    if not launched:  # the launcher checks again; this way no preflight simulator starts first
        check_local_processes("--ranks", ranks, oversubscribe=oversubscribe)
    check_out_dir(out)
    overrides = parse_sets(set_)
    channel_specs = [parse_channel(text) for text in channels]  # parsed once, here; trusted inside
    plan = plan_grid(
        scenario,
        methods=_split(algo if algo is not None else controllers),
        kind="algo" if algo is not None else "controller",
        algo_axes=_axes(algo_set),
        policies=_named_paths(policies),
        protocols=_split(protocols) or ["none"],
        channels=channel_specs,  # plan_grid dedupes by canonical spelling
        seeds=seeds,
        episodes=episodes,
        overrides=overrides,
        steps=steps,
    )
    if not launched:  # under MPI the command that launched us has checked already
        preflight(scenario, overrides, channel_specs)
    make_out_dir(out)

    world = None
    # Cheap check first: marl.distributed imports torch, which a plain compare does not need.
    if ranks > 1 or launched:
        try:
            from marl.distributed import DistConfig, init_world, launch_if_needed
        except ImportError as exc:
            raise ConfigError(f"--ranks needs marl.distributed, which is not available: {exc}") from None
        dist = DistConfig(ranks=ranks, oversubscribe=oversubscribe)
        launch_if_needed(dist, sys.argv)  # execs mpiexec and exits when not yet under a launcher
        world = init_world(dist)
    rank, size = (world.rank, world.size) if world is not None else (0, 1)

    write_plan(plan, out, world_size=size)  # every rank checks a resumed directory; same content
    if rank == 0 and plan.skipped:
        for reason in dict.fromkeys(s.reason for s in plan.skipped):
            n = sum(s.reason == reason for s in plan.skipped)
            err.print(f"note: {n} combination(s) skipped: {reason}", markup=False, soft_wrap=True)
    mine = [cell for i, cell in enumerate(plan.cells) if i % size == rank]
    jobs = 1 if world is not None else (jobs or os.cpu_count() or 1)
    counts = _run_with_progress(plan, mine, out, jobs, inject_failure, show=rank == 0, err=err)

    if world is not None:
        totals = world.mean_metrics({"ran": float(counts[0]), "reused": float(counts[1])})
        counts = (round(totals["ran"] * size), round(totals["reused"] * size))
        world.close()  # barrier: every rank has finished its cells before rank 0 merges
        if rank != 0:
            return 0
    return _summarise(scenario, plan, out, counts, size, err)


def _summarise(scenario: str, plan: GridPlan, out: str, counts: tuple[int, int], size: int, err: Console) -> int:
    """Merge the cells' records, print the summary and any failures; exit code 1 if a cell failed."""
    from marl.results.cells import collect_cells, merge_cells, stale_cells

    _finished, rows = merge_cells(out)
    _, failed = collect_cells(out)  # failures of this plan's cells only (not stale directories)
    stale = stale_cells(out)
    if stale:
        err.print(
            f"note: {len(stale)} cell director(ies) in {Path(out) / 'cells'} belong to an earlier "
            f"compare with other settings and are ignored: {_listing(stale)}",
            markup=False,
            soft_wrap=True,
        )
    ran, reused = counts
    summary = (
        f"compare {scenario}: {len(plan.cells)} cells — {ran} run now, {reused} already done, "
        f"{len(failed)} failed; {rows} rows in {Path(out) / 'records.csv'}"
        + (f" (world size {size})" if size > 1 else "")
    )
    shown = list(failed.items())[:_MAX_FAILURES_SHOWN]
    for key, line in shown:
        err.print(
            f"  failed {key}: {line}  (see {Path(out) / 'cells' / key / 'error.txt'})", markup=False, soft_wrap=True
        )
    if len(failed) > len(shown):
        err.print(
            f"  ... and {len(failed) - len(shown)} more (see {Path(out) / 'failures.json'})",
            markup=False,
            soft_wrap=True,
        )
    click.echo(summary)
    return 1 if failed else 0


def _axes(items: tuple[str, ...]) -> dict[str, list[str]]:
    """``("learning_rate=3e-4,1e-3",)`` -> ``{"learning_rate": ["3e-4", "1e-3"]}``."""
    from marl.core.errors import ConfigError, show

    axes: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad --algo-set {show(item)}; expected KEY=V1,V2, e.g. learning_rate=3e-4,1e-3")
        if key.strip() in axes:
            raise ConfigError(f"bad --algo-set {show(item)}: {key.strip()} is given twice; list its values once")
        axes[key.strip()] = _split(values)
    return axes


def _named_paths(items: tuple[str, ...]) -> dict[str, str]:
    """``("idqn=runs/a",)`` -> ``{"idqn": "runs/a"}``; a name given twice is refused."""
    from marl.core.errors import ConfigError, show

    named: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"bad --policy {show(item)}; expected NAME=PATH, e.g. idqn=results/train-run")
        if name.strip() in named:
            raise ConfigError(f"bad --policy {show(item)}: the name {name.strip()} is given twice")
        named[name.strip()] = path.strip()
    return named


def _listing(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _run_with_progress(
    plan: GridPlan, cells: list[Cell], out: str, jobs: int, inject_failure: str, *, show: bool, err: Console
) -> tuple[int, int]:
    """Run ``cells`` with a rich progress bar; returns (cells run now, cells already done)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from marl.compare import CellOutcome, run_grid

    counts = {"done": 0, "skipped": 0, "failed": 0}
    running: dict[str, tuple[int, float]] = {}  # key -> (env steps, fraction done)
    finished_steps = [0]
    ended_keys: set[str] = set()  # a late progress message must not revive a finished cell
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
        disable=not show,
    )

    with progress:
        task = progress.add_task("cells", total=len(cells), status="")

        def refresh() -> None:
            ended = counts["done"] + counts["skipped"] + counts["failed"]
            steps = finished_steps[0] + sum(s for s, _ in running.values())
            parts = [f"{counts['done']} ok", f"{counts['failed']} failed", f"{len(running)} running"]
            if counts["skipped"]:
                parts.insert(1, f"{counts['skipped']} reused")
            status = ", ".join(parts) + f", {steps:,} steps"
            # Whole cells only in the M/N count; running cells' fractions move the bar smoothly.
            progress.update(task, completed=ended + sum(f for _, f in running.values()), status=status)

        def on_outcome(outcome: CellOutcome) -> None:
            counts[outcome.status] += 1
            ended_keys.add(outcome.key)
            steps, _ = running.pop(outcome.key, (0, 0.0))
            finished_steps[0] += steps
            refresh()

        def on_progress(key: str, steps: int | None, fraction: float | None) -> None:
            if key in ended_keys:
                return
            old_steps, old_fraction = running.get(key, (0, 0.0))
            running[key] = (old_steps if steps is None else steps, old_fraction if fraction is None else fraction)
            refresh()

        run_grid(
            plan,
            out,
            jobs=jobs,
            cells=cells,
            inject_failure=inject_failure,
            on_outcome=on_outcome,
            on_progress=on_progress,
        )
    return counts["done"] + counts["failed"], counts["skipped"]
