"""``marl train SCENARIO``: train IPPO or MAPPO (optionally with a learned protocol) on a scenario.

Examples::

    marl train traffic/2x2grid --algo ippo --protocol tarmac --steps 20000
    marl train traffic/grid4x4 --algo mappo --algo-set learning_rate=1e-3 --algo-set num_steps=256
    marl train traffic/2x2grid --show-config          # print every option with its default
    marl train traffic/2x2grid --resume results/train-traffic-2x2grid-ippo-.../
    marl train traffic/grid4x4 --ranks 4 --sync allreduce --compress fp16
    marl train traffic/grid4x4 --ranks 8 --hostfile hosts.txt     # over several machines
    marl train traffic/grid4x4 --envs 2                # two simulations at once on one rank

Options not given come from the scenario's training preset (``TrainingPreset`` in its
registration: the algorithm, protocol, budget and ``--algo-set`` values that measured best there),
so ``marl train traffic/cologne8`` alone trains the best known learner; ``--show-config`` shows
what the preset supplied. ``--set key=value`` goes to the scenario (its env card lists the keys); ``--algo-set key=value``
goes to the algorithm's typed config (``--show-config`` lists keys, types, defaults and help).
The trained policy is evaluated by ``marl run SCENARIO --policy <out dir or checkpoint>``.
"""

from __future__ import annotations

import shlex
import sys
from typing import Any

import click

from marl.options import channel_option, out_option, protocol_option, seed_option, set_option
from marl.training.request import request_default

__all__ = ["command"]


@click.command("train", context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("scenario")
@click.option(
    "--algo",
    default=request_default("algo"),
    show_default=False,
    help="Learning algorithm (see 'marl list algorithms'); default: the scenario's training preset.",
)
@protocol_option
@channel_option
@click.option(
    "--steps",
    type=int,
    default=request_default("steps"),
    show_default=False,
    help="Environment steps to train for (total over ranks); default: the scenario's training preset.",
)
@seed_option
@out_option("Results directory; default results/train-<scenario>-<algo>-<time>.")
@click.option(
    "--resume", default=None, help="Continue from a checkpoint (training output dir, checkpoints dir or .pt)."
)
@set_option
@click.option(
    "--algo-set",
    "algo_set",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override an algorithm hyper-parameter (repeatable); see --show-config.",
)
@click.option(
    "--eval-episodes",
    type=int,
    default=request_default("eval_episodes"),
    help="Final evaluation episodes (the episodes of 'marl run --seed SEED --episodes n').",
)
@click.option(
    "--preset/--no-preset",
    default=True,
    help="Take options not given from the scenario's training preset; --no-preset: the bare defaults.",
)
@click.option("--show-config", is_flag=True, help="Print the algorithm, scenario and distributed config and exit.")
@click.option("--test", "test_preset", is_flag=True, hidden=True, help="Use the scenario's short test presets.")
@click.option("--ranks", type=int, default=1, help="MPI ranks; > 1 relaunches under the venv's mpiexec.")
@click.option("--envs", type=int, default=None, help="Envs stepped at once per rank; default 1, or --resume's.")
@click.option("--oversubscribe", is_flag=True, help="Allow more --ranks than 4 per core (up to what memory holds).")
@click.option("--hostfile", default="", help="Open MPI hostfile ('name slots=N' per line): spread --ranks over hosts.")
@click.option("--host", default="", help="Hosts for --ranks as mpiexec takes them, e.g. node1:4,node2:4.")
@click.option("--sync", default="allreduce", help="Gradient sync: allreduce, ring, ps, gossip.")
@click.option("--compress", default="none", help="Gradient compression: none, fp16, topk:RATIO, powersgd:RANK.")
@click.option("--bucket-mb", type=float, default=25.0, help="Fused gradient bucket size, MB.")
@click.option("--overlap/--no-overlap", default=False, help="Overlap bucket allreduce with backward.")
@click.option("--fault-tolerance", default="none", help="none, ulfm or checkpoint.")
@click.option(
    "--respawn", is_flag=True, help="With ulfm: replace a lost rank by a new one; the world grows back to --ranks."
)
@click.option(
    "--sync-every", type=int, default=1, help="K local updates, then one parameter averaging round (allreduce, gossip)."
)
@click.option("--respawned", is_flag=True, hidden=True, help="Set by --respawn on the replacement's command line.")
@click.option(
    "--inject-failure",
    default="",
    hidden=True,
    help="R:U kills rank R at update U (tests, demos); R1:U1,R2:U2 kills several (R: the rank at launch).",
)
def command(
    scenario: str,
    algo: str,
    protocol: str,
    channel: str,
    steps: int,
    seed: int,
    out: str | None,
    resume: str | None,
    set_: tuple[str, ...],
    algo_set: tuple[str, ...],
    eval_episodes: int,
    preset: bool,
    show_config: bool,
    test_preset: bool,
    envs: int | None,
    **dist: Any,
) -> None:
    """Train a learning algorithm on SCENARIO; write checkpoints, training curves and a final
    evaluation (same records as 'marl run')."""
    # (``dist``: the options from --ranks to --inject-failure, named as DistConfig's fields.)
    from rich.console import Console

    from marl.core import registry
    from marl.core.config import describe_config, parse_sets
    from marl.distributed.config import DistConfig
    from marl.training import TrainRequest, algorithm_config, prepare, train

    console = Console()
    if preset:
        algo, protocol, channel, steps, algo_overrides, overrides, preset_note = _preset(
            scenario, algo, protocol, channel, steps, algo_set, set_, resume
        )
    else:  # the bare defaults of TrainRequest and the algorithm's Config, under what was given
        algo_overrides, overrides, preset_note = parse_sets(algo_set), parse_sets(set_), ""
    dist_cfg = DistConfig(**dist)
    envs = envs if envs is not None else _checkpoint_envs(resume)
    request = TrainRequest(
        scenario=scenario,
        algo=algo,
        protocol=protocol,
        channel=channel,
        steps=steps,
        seed=seed,
        out=out,
        overrides=overrides,
        algo_overrides=algo_overrides,
        eval_episodes=eval_episodes,
        resume=resume,
        test=test_preset,
        dist=dist_cfg,
        envs=envs,
    )
    if show_config:
        config = algorithm_config(algo, algo_overrides)
        scenario_cfg = registry.scenario_config(scenario, overrides, test=test_preset)
        if preset_note:
            console.print(preset_note, markup=False, highlight=False)
        console.print(f"[bold]algorithm {algo}[/bold]  (--algo-set key=value)", highlight=False)
        console.print(describe_config(config), markup=False, highlight=False)
        console.print(f"\n[bold]scenario {scenario}[/bold]  (--set key=value)", highlight=False)
        console.print(describe_config(scenario_cfg), markup=False, highlight=False)
        console.print("\n[bold]distributed[/bold]", highlight=False)
        console.print(describe_config(dist_cfg), markup=False, highlight=False)
        return
    # Every name and value, the --resume checkpoint and --out are checked here, before an MPI
    # launcher, a simulator or any output starts.
    plan = prepare(request)
    if dist_cfg.ranks > 1:
        from marl.distributed import launch_if_needed

        launch_if_needed(dist_cfg, sys.argv)
    if _launcher_rank() != 0 or dist_cfg.respawned:  # under mpiexec only rank 0 draws progress and prints results
        train(plan)
        return
    err_console = Console(stderr=True)
    if preset_note:
        err_console.print(preset_note, markup=False, highlight=False, soft_wrap=True)
    result = _train_with_progress(plan, err_console)
    _summary(console, request, result)


def _preset(
    scenario: str,
    algo: str,
    protocol: str,
    channel: str,
    steps: int,
    algo_set: tuple[str, ...],
    set_: tuple[str, ...],
    resume: str | None,
) -> tuple[str, str, str, int, dict[str, Any], dict[str, Any], str]:
    """(algo, protocol, channel, steps, algo overrides, scenario overrides, note): the options
    given, the rest from the checkpoint when resuming (its algorithm, protocol and channel; its
    config and scenario options stay its own), else from the scenario's training preset. Click
    reports whether a value came from the command line or the option's default."""
    from click.core import ParameterSource

    from marl.core.config import parse_sets
    from marl.training.request import preset_sets, with_preset

    ctx = click.get_current_context()

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)

    if resume is not None:
        from marl.training.checkpoint import load_checkpoint

        meta = load_checkpoint(resume)["meta"]
        algo, protocol, steps, _, note = with_preset(
            scenario,
            algo if given("algo") else meta["algo"],
            protocol if given("protocol") else meta["protocol"],
            steps if given("steps") else None,
            {},
        )
        channel = channel if given("channel") else meta["channel"]
        return algo, protocol, channel, steps, parse_sets(algo_set), parse_sets(set_), note
    algo, protocol, steps, overrides, note = with_preset(
        scenario,
        algo if given("algo") else None,
        protocol if given("protocol") else None,
        steps if given("steps") else None,
        parse_sets(algo_set),
    )
    sets, from_preset = preset_sets(scenario, algo, parse_sets(set_))
    if from_preset:
        note = (
            note.replace(" (", from_preset + " (", 1)
            if " (" in note
            else (note or f"{scenario} training preset:") + from_preset
        )
    return algo, protocol, channel, steps, overrides, sets, note


def _checkpoint_envs(resume: str | None) -> int:
    """``--envs`` not given: the resumed checkpoint's (a run keeps its number of envs), else 1."""
    if resume is None:
        return 1
    from marl.training.checkpoint import load_checkpoint

    return int(load_checkpoint(resume).get("envs", 1))


def _launcher_rank() -> int:
    """This process's rank as the MPI launcher set it (0 outside MPI); read from the environment
    so the CLI need not import mpi4py."""
    import os

    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _train_with_progress(plan: Any, err_console: Any) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from marl.training import train

    request = plan.request
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[sps]:>6.0f} steps/s"),
        TextColumn("return {task.fields[ret]:>8.3f}"),
        TextColumn("{task.fields[kpi]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )
    with progress:
        task = progress.add_task(
            f"{request.algo} {request.scenario}", total=request.steps, sps=0.0, ret=float("nan"), kpi=""
        )

        def on_progress(info: dict[str, Any]) -> None:
            fields: dict[str, Any] = {}
            if info.get("phase") == "train":
                fields.update(sps=info.get("steps_per_second", 0.0), ret=info.get("episode_return", float("nan")))
                value = info.get("kpi_value")
                if info.get("kpi") and value is not None and value == value:
                    fields["kpi"] = f"{info['kpi']} {value:.4g}"
            else:
                value = info.get("kpi_value")
                kpi = f"{info['kpi']} {value:.4g}" if info.get("kpi") and value == value else ""
                fields["kpi"] = f"eval return {info.get('eval_return', float('nan')):.3f} {kpi}"
            progress.update(task, completed=min(info["env_steps"], request.steps), total=request.steps, **fields)

        return train(plan, on_progress=on_progress)


def _summary(console: Any, request: Any, result: Any) -> None:
    from rich.table import Table

    table = Table(
        title=f"{request.scenario} — {result.method} after {result.env_steps} steps "
        f"({result.updates} updates, {result.seconds:.0f} s, {result.steps_per_second:.0f} steps/s)",
        header_style="bold",
    )
    table.add_column("KPI (final evaluation, mean)")
    table.add_column("value", justify="right")
    for key, value in result.final_kpis.items():
        table.add_row(key, f"{value:.4g}")
    console.print(table)
    console.print(f"records: {result.out_dir / 'records.csv'}  (run {result.run_id})")
    if result.checkpoint is not None:
        console.print(f"checkpoint: {result.checkpoint}")
        console.print(
            f"evaluate: marl run {shlex.quote(request.scenario)} --policy {shlex.quote(str(result.out_dir))}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )  # copy-pastable: never wrapped
