"""The ``marl`` command line.

Core commands live here (``list``, ``run``); larger ones live in ``marl/commands/<name>.py`` and
benchmarks in ``marl/bench/<name>.py``, each exposing a ``click.Command`` named ``command`` that
this module mounts. Those modules import heavy libraries (torch, SUMO, MPI) inside ``command``
so that ``marl --help`` stays fast.

User errors (:class:`~marl.core.errors.ConcordError` and click's usage errors) are printed as one line
on stderr with exit code 2 and no traceback.
"""

from __future__ import annotations

import importlib
import sys

import click
from rich.console import Console
from rich.table import Table

from marl.core import registry
from marl.core.config import build_config, parse_sets
from marl.core.errors import ConcordError, closest, one_line, unknown
from marl.options import channel_option, out_option, protocol_option, seed_option, set_option

__all__ = ["app", "main"]

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


@click.group(name="marl", context_settings=CONTEXT)
@click.version_option(package_name="concord-marl")
def app() -> None:
    """Concord: multi-agent coordination on real infrastructure simulators."""


@app.group("bench", context_settings=CONTEXT)
def bench_app() -> None:
    """Performance benchmarks; each prints ratios against a reference measured in the same run."""


# Piped output (files, CI logs) gets a wide console instead of rich's 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160, emoji=False)

#: Commands implemented in their own modules: name -> module exposing ``command``.
COMMAND_MODULES = {
    "train": "marl.commands.train",
    "compare": "marl.commands.compare",
    "report": "marl.commands.report",
}
#: Benchmarks: name -> module exposing ``command``.
BENCH_MODULES = {
    "traffic": "marl.bench.traffic",
    "comms": "marl.bench.comms",
    "grid": "marl.bench.grid",
    "warehouse": "marl.bench.warehouse",
    "learn": "marl.bench.learn",
    "allreduce": "marl.bench.allreduce",
    "scaling": "marl.bench.scaling",
    "scale": "marl.bench.scale",
    "recovery": "marl.bench.recovery",
    "chaos": "marl.bench.chaos",
}

LIST_KINDS = ("scenarios", "controllers", "protocols", "algorithms")


@app.command("list")
@click.argument("kind", default="scenarios", metavar="[scenarios|controllers|protocols|algorithms]")
def list_command(kind: str) -> None:
    """List registered scenarios, controllers, protocols or algorithms."""
    if kind not in LIST_KINDS:
        raise unknown("list kind", kind, LIST_KINDS)
    rows: list[tuple[str, ...]]
    if kind == "scenarios":
        columns: tuple[str, ...] = ("scenario", "agents", "simulator", "default controller", "description")
        rows = [
            (
                sid,
                "varies" if spec.n_agents is None else str(spec.n_agents),
                spec.simulator,
                spec.default_controller,
                spec.description,
            )
            for sid, spec in registry.scenarios().items()
        ]
    elif kind == "controllers":
        columns = ("domain", "controller", "talks", "scenarios", "description")
        rows = [
            (domain, name, "yes" if spec.uses_messages else "no", ", ".join(spec.scenarios) or "all", spec.description)
            for (domain, name), spec in registry.controllers().items()
        ]
    elif kind == "protocols":
        columns = ("protocol", "kind", "description")
        rows = [
            (name, "learned" if spec.learned else "rule-based", spec.description)
            for name, spec in registry.protocols().items()
        ]
    else:
        columns = ("algorithm", "description")
        rows = [(name, spec.description) for name, spec in registry.algorithms().items()]
    table = Table(box=None, header_style="bold")
    for name in columns:
        # Ids and short fields never wrap; only the free-text description does.
        if name == "description":
            table.add_column(name, min_width=30)
        else:
            table.add_column(name, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console.print(table)


@app.command("run")
@click.argument("scenario")
@click.option("--controller", default=None, help="Controller (see 'marl list controllers'); default: the scenario's.")
@click.option("--episodes", type=int, default=1, help="Number of episodes.")
@seed_option
@out_option("Results directory; default results/<scenario>-<time>.")
@set_option
@click.option(
    "--controller-set",
    "controller_set",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a controller parameter (repeatable), e.g. --controller-set patience=0.",
)
@protocol_option
@channel_option
@click.option("--policy", default=None, help="Evaluate a trained policy checkpoint instead of a controller.")
def run_command(
    scenario: str,
    controller: str | None,
    episodes: int,
    seed: int,
    out: str | None,
    set_: tuple[str, ...],
    controller_set: tuple[str, ...],
    protocol: str,
    channel: str,
    policy: str | None,
) -> None:
    """Run episodes of SCENARIO (e.g. traffic/grid4x4) with a controller or a trained policy,
    print a KPI table and append results records."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from marl.runner import RunRequest, run

    # Validate every name and value before a simulator starts, so errors come at once. The
    # channel spec is parsed here, once; what goes on is its canonical spelling.
    spec = registry.scenario_spec(scenario)
    controller_overrides = parse_sets(controller_set, "--controller-set")
    if policy is None:
        name = controller or spec.default_controller
        controller_spec = registry.scenario_controller(scenario, name)
        controller_cls = registry.load(controller_spec.entry_point)
        build_config(
            controller_cls.Config, controller_overrides, what="--controller-set key", owner=f"controller {name}"
        )
        # A talking controller's own protocol when none is named (demand response's consensus
        # needs its averaging rounds; with "none" a --channel would carry nothing).
        given = click.get_current_context().get_parameter_source("protocol") != click.core.ParameterSource.DEFAULT
        if not given and controller_spec.protocol != "none":
            protocol = controller_spec.protocol
    overrides = parse_sets(set_)
    registry.scenario_config(scenario, overrides)
    if protocol != "none" or channel:
        from comms.channel import parse_channel
        from comms.runtime import validate_protocol

        validate_protocol(protocol)
        channel = parse_channel(channel).canonical()
    request = RunRequest(
        scenario=scenario,
        controller=controller,
        episodes=episodes,
        seed=seed,
        out=out,
        overrides=overrides,
        controller_overrides=controller_overrides,
        protocol=protocol,
        channel=channel,
        policy=policy,
    )

    bar_console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("episode {task.completed}/{task.total}"),
        TextColumn("{task.fields[steps]} steps"),
        TimeElapsedColumn(),
        console=bar_console,
        transient=True,
        # Off a terminal a transient bar would still leave an empty line before any error.
        disable=not bar_console.is_terminal,
    )
    with progress:
        task = progress.add_task(scenario, total=episodes, steps=0)
        result = run(
            request,
            on_step=lambda n: progress.update(task, steps=n) if n % 20 == 0 else None,
            on_episode=lambda i, _: progress.update(task, completed=i + 1),
        )
    console.print(kpi_table(scenario, result.method, result.episodes))
    console.print(f"records: {result.out_dir / 'records.csv'}  (run {result.run_id})")


def kpi_table(scenario: str, method: str, episodes: list[dict[str, float]]) -> Table:
    """A rich table: one row per KPI, one column per episode, plus the mean over episodes."""
    import numpy as np

    table = Table(title=f"{scenario} — {method}", header_style="bold")
    table.add_column("KPI")
    for i in range(len(episodes)):
        table.add_column(f"ep {i}", justify="right")
    if len(episodes) > 1:
        table.add_column("mean", justify="right")
    for key in episodes[0] if episodes else []:
        values = [ep[key] for ep in episodes]
        cells = [f"{v:.4g}" for v in values]
        if len(episodes) > 1:
            cells.append(f"{np.mean(values):.4g}")
        table.add_row(key, *cells)
    return table


def _mount(group: click.Group, name: str, module_name: str) -> None:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:  # not built yet: the command is simply absent
            return
        raise
    group.add_command(module.command, name)


for _name, _module in COMMAND_MODULES.items():
    _mount(app, _name, _module)
for _name, _module in BENCH_MODULES.items():
    _mount(bench_app, _name, _module)


def _usage_hint(exc: click.UsageError) -> str:
    """For an unknown option, name the allowed ones and the closest match."""
    if isinstance(exc, click.NoSuchOption) and exc.ctx is not None:
        allowed = sorted(o for p in exc.ctx.command.params for o in p.opts if o.startswith("--"))
        hint = closest(exc.option_name, allowed)
        did = f"; did you mean '{hint}'?" if hint else ""
        return f"unknown option '{exc.option_name}'{did} allowed: {', '.join(allowed)}"
    return exc.format_message()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``marl`` script; returns the exit code (2 for any user error)."""
    # emoji=False: a user value such as 'a:x:b' must be printed as typed, not as an emoji.
    err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
    try:
        rv = app.main(args=argv, prog_name="marl", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.NoArgsIsHelpError as exc:  # `marl` or `marl bench` alone
        click.echo(exc.ctx.get_help())
        return 0
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "marl"
        # one_line: click echoes the user's text; a newline or escape in it must not reach the terminal raw.
        err.print(f"{where}: error: {one_line(_usage_hint(exc))}", markup=False)
        return 2
    except ConcordError as exc:
        err.print(f"marl: error: {one_line(str(exc))}", markup=False)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        err.print("marl: interrupted; finished episodes are kept in the results directory", markup=False)
        return 130


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
