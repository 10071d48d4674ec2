"""``marl bench learn SCENARIO``: how fast training runs, and how good the trained policies are.

**Speed.** Training throughput — environment steps per second of acting *and* learning updates — is
put against the environment's own stepping rate with a fixed controller (the domain's ``random``
controller, through the same episode loop as ``marl run``), both measured in this process, the
reference once before and once after training (their mean), so machine load hits both alike.
``ratio = train steps/s / env steps/s``; the target is >= 0.7 (learning overhead <= 30 %).
The training run also reports the share of its own time spent inside ``env.step``/``reset``
(``1 -`` that share is the learning overhead), which does not depend on the traffic state: on
SUMO nets a random controller congests the network, which then simulates more slowly than under
a trained policy, so the ratio alone can exceed 1.

**Quality.** Every learner in ``--methods`` (``algo`` or ``algo+protocol``; default: the
scenario's training preset, :class:`marl.core.registry.TrainingPreset`) is trained with
``--seeds K`` seeds (0..K-1) for ``--steps`` environment steps (default: the preset's budget),
and every classical controller of the domain (``--baselines all``; talking ones with the
``neighbours`` protocol) runs on the same seeds. Each job is its own ``marl train`` / ``marl run``
process (libsumo holds one simulation per process), ``--jobs`` at a time. For seed ``s`` every
method is scored on the episodes of ``marl run --seed s --episodes E`` (:mod:`marl.core.seeding`;
training episodes come from a disjoint stream, so these are held out), so methods meet the same
traffic seed by seed. All jobs write ordinary records into one directory, and the comparison
(mean and 95 % CI over seeds, IQM, tables, learning curves) is ``marl report``'s, built in the
same command. RESCO (Ault & Sharon 2021) trains 100 one-hour episodes (36,000 decisions at
10 s); the budget used is printed beside every table.

Written to ``--out``: ``cells/<job>/`` (each job's records, manifest, checkpoints and output, as
``marl compare`` lays out cells; a rerun skips finished ones), the merged ``records.csv`` and
``manifests/``, ``report/`` (marl report), ``learn_bench.json`` and ``learn_bench.md``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

__all__ = ["Job", "command", "env_steps_per_second", "plan_jobs", "run_jobs", "measure_speed"]


def env_steps_per_second(
    scenario: str, overrides: dict[str, str], controller: str, steps: int, seed: int = 0, test: bool = False
) -> float:
    """Env steps/s of ``controller`` through ``marl run``'s episode loop (resets included)."""
    import numpy as np

    from marl.core import registry
    from marl.core.seeding import episode_seed
    from marl.episodes import run_episode
    from marl.runner import build_controller

    env = registry.make_scenario(scenario, overrides, test=test)
    try:
        ctrl = build_controller(scenario, controller, env)
        done, episode = 0, 0
        start = time.perf_counter()
        while done < steps:
            kpis = run_episode(env, ctrl, None, seed=episode_seed(seed, episode))
            done += int(kpis["env_steps"])
            episode += 1
        return done / (time.perf_counter() - start) if done else float(np.nan)
    finally:
        env.close()


def measure_speed(
    scenario: str,
    overrides: dict[str, str],
    algo: str,
    protocol: str,
    steps: int,
    algo_overrides: dict[str, str],
    seed: int,
    out: Path,
    test: bool = False,
) -> dict[str, Any]:
    """Training steps/s vs the env's own steps/s (random controller), same process, sandwiched."""
    from marl.core import registry
    from marl.training import TrainRequest, train

    names = set(registry.controllers_for(scenario))
    controller = "random" if "random" in names else registry.scenario_spec(scenario).default_controller
    before = env_steps_per_second(scenario, overrides, controller, steps, seed, test)
    result = train(
        TrainRequest(
            scenario=scenario,
            algo=algo,
            protocol=protocol,
            steps=steps,
            seed=seed,
            out=str(out / "speed"),
            overrides=overrides,
            algo_overrides={"eval_every": "0", **algo_overrides},
            eval_episodes=0,
            test=test,
        )
    )
    after = env_steps_per_second(scenario, overrides, controller, steps, seed, test)
    reference = (before + after) / 2
    return {
        "scenario": scenario,
        "algo": algo,
        "protocol": protocol,
        "steps": result.env_steps,
        "reference_controller": controller,
        "env_steps_per_second": reference,
        "env_before": before,
        "env_after": after,
        "train_steps_per_second": result.steps_per_second,
        "ratio": result.steps_per_second / reference if reference else float("nan"),
        # Within the training run itself: the share of time spent stepping the env. Unlike the
        # ratio it does not depend on the traffic the two controllers create (a random controller
        # congests SUMO nets, which then simulate more slowly than under a learned policy).
        "env_time_fraction": result.env_fraction,
    }


@dataclass(frozen=True)
class Job:
    """One process of the quality comparison: a classical controller's evaluation or a training run."""

    kind: str  #: "run" | "train"
    method: str  #: controller name, or algorithm name
    protocol: str
    seed: int
    argv: tuple[str, ...]  #: the marl command line (after ``marl``)

    @property
    def name(self) -> str:
        proto = "" if self.protocol == "none" else f"+{self.protocol}"
        return f"{self.method}{proto}-seed{self.seed}"


def plan_jobs(
    scenario: str,
    learners: list[tuple[str, str]],
    baselines: list[str],
    seeds: int,
    steps: int,
    eval_episodes: int,
    out: Path,
    sets: tuple[str, ...],
    algo_sets: tuple[str, ...],
) -> list[Job]:
    """Every job of the comparison: each baseline and each learner on seeds 0..seeds-1. Each job
    writes into its own cell ``out/cells/<kind>-<name>`` (a training run's checkpoints must not
    meet another's), merged afterwards as ``marl compare`` merges its cells. A talking controller
    gets the ``neighbours`` protocol. Learners come first: they take longest, so a pool of
    ``--jobs`` workers finishes sooner."""
    from marl.core import registry
    from marl.results.cells import CELLS_DIR

    common = [f"--set={kv}" for kv in sets]
    jobs: list[Job] = []

    def add(kind: str, method: str, protocol: str, seed: int, argv: list[str]) -> None:
        job = Job(kind, method, protocol, seed, ())
        cell = out / CELLS_DIR / f"{kind}-{job.name}"
        jobs.append(Job(kind, method, protocol, seed, (*argv, "--out", str(cell), *common)))

    for seed in range(seeds):
        for algo, protocol in learners:
            add(
                "train",
                algo,
                protocol,
                seed,
                [
                    "train",
                    scenario,
                    "--algo",
                    algo,
                    "--protocol",
                    protocol,
                    "--steps",
                    str(steps),
                    "--seed",
                    str(seed),
                    "--eval-episodes",
                    str(eval_episodes),
                    *[f"--algo-set={kv}" for kv in algo_sets],
                ],
            )
    for seed in range(seeds):
        for name in baselines:
            ctrl = registry.scenario_controller(scenario, name)
            protocol = ctrl.protocol if ctrl.protocol != "none" else "neighbours" if ctrl.uses_messages else "none"
            add(
                "run",
                name,
                protocol,
                seed,
                [
                    "run",
                    scenario,
                    "--controller",
                    name,
                    "--protocol",
                    protocol,
                    "--seed",
                    str(seed),
                    "--episodes",
                    str(eval_episodes),
                ],
            )
    return jobs


def run_jobs(jobs: list[Job], jobs_at_once: int, on_done: Any = None) -> list[dict[str, Any]]:
    """Run every job as its own ``marl`` process, ``jobs_at_once`` at a time (each with torch and
    BLAS on one thread); returns one summary per job (name, exit code, seconds, log file).

    A job's cell gets ``output.log``, then ``done.json`` (written last, atomically) or
    ``error.txt`` (:mod:`marl.results.cells`); a cell already done is skipped, so rerunning the
    same command finishes an interrupted bench. A failed job is reported, not retried.
    """
    import os
    import shutil
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from marl.results.cells import DONE_FILE, ERROR_FILE
    from marl.results.io import atomic_write_json, atomic_write_text

    marl = str(Path(sys.executable).with_name("marl"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def one(job: Job) -> dict[str, Any]:
        cell = Path(job.argv[job.argv.index("--out") + 1])
        log = cell / "output.log"
        summary = {"job": job.name, "kind": job.kind, "log": str(log), "command": "marl " + " ".join(job.argv)}
        if (cell / DONE_FILE).exists():
            return {**summary, "exit_code": 0, "seconds": 0.0, "skipped": True}
        if cell.exists():  # a partial cell of an interrupted bench: start it again
            shutil.rmtree(cell)
        cell.mkdir(parents=True)
        t0 = time.perf_counter()
        with log.open("w") as fh:
            code = subprocess.run(
                [marl, *job.argv], stdout=fh, stderr=subprocess.STDOUT, env=env, check=False
            ).returncode
        seconds = time.perf_counter() - t0
        if code == 0:
            atomic_write_json(cell / DONE_FILE, {"key": cell.name, "seconds": seconds})
        else:
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
            atomic_write_text(cell / ERROR_FILE, (lines[-1] if lines else f"exit code {code}") + "\n")
        done = {**summary, "exit_code": code, "seconds": seconds}
        if on_done is not None:
            on_done(done)
        return done

    with ThreadPoolExecutor(max_workers=jobs_at_once) as pool:
        return list(pool.map(one, jobs))


def _markdown(
    speed: dict[str, Any] | None,
    report: str,
    scenario: str,
    steps: int,
    seeds: int,
    episode_steps: int | None,
    failed: list[dict[str, Any]],
) -> str:
    lines = [f"# marl bench learn {scenario}", ""]
    if speed is not None:
        lines += [
            "## Speed (same process; reference = env with the "
            f"`{speed['reference_controller']}` controller, mean of before/after)",
            "",
            "| algo | protocol | steps | env steps/s | train steps/s | ratio (target >= 0.7) "
            "| env share of training time |",
            "|---|---|---|---|---|---|---|",
            f"| {speed['algo']} | {speed['protocol']} | {speed['steps']} | {speed['env_steps_per_second']:.1f} "
            f"| {speed['train_steps_per_second']:.1f} | {speed['ratio']:.2f} | {speed['env_time_fraction']:.2f} |",
            "",
        ]
    if report:
        budget = f"{steps} env steps per learner and seed"
        if episode_steps:
            budget += f" (= {steps / episode_steps:.1f} episodes of {episode_steps} decisions; RESCO: 100)"
        lines += [
            f"## Quality: {seeds} seeds per method, same evaluation episodes per seed; training budget {budget}",
            "",
        ]
        if failed:
            lines += [
                f"**{len(failed)} job(s) failed** (their rows are missing): "
                + ", ".join(f"{f['job']} (exit {f['exit_code']}, log {f['log']})" for f in failed),
                "",
            ]
        lines.append(report)
    return "\n".join(lines) + "\n"


def _learners(methods: str, scenario: str) -> list[tuple[str, str]]:
    """``algo`` / ``algo+protocol`` entries, checked; "preset" is the scenario's training preset."""
    from marl.core import registry
    from marl.core.errors import ConfigError

    preset = registry.scenario_spec(scenario).training
    out: list[tuple[str, str]] = []
    for entry in (m.strip() for m in methods.split(",")):
        if not entry:
            continue
        algo, _, protocol = (f"{preset.algo}+{preset.protocol}" if entry == "preset" else entry).partition("+")
        registry.algorithm_spec(algo)
        learned = registry.protocol_spec(protocol or "none").learned
        if learned and getattr(registry.load(registry.algorithm_spec(algo).entry_point), "off_policy", False):
            raise ConfigError(f"bad --methods entry '{entry}': {algo} cannot use learned protocol {protocol}")
        out.append((algo, protocol or "none"))
    if not out:
        raise ConfigError(f"bad --methods '{methods}'; allowed: comma-separated algo or algo+protocol, or 'preset'")
    return out


@click.command("learn", context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("scenario")
@click.option(
    "--methods",
    default="preset",
    help="Comma-separated learners, algo or algo+protocol ('preset': the scenario's training preset).",
)
@click.option(
    "--steps", type=int, default=None, help="Training budget per learner and seed (env steps); default: the preset's."
)
@click.option("--seeds", type=int, default=3, help="Seeds per method (0..K-1); >= 3 for a confidence interval.")
@click.option("--jobs", type=int, default=2, help="Processes at once (each job is one marl train / marl run).")
@click.option(
    "--baselines", default="all", help="Comma-separated classical controllers; 'all': every one of the domain."
)
@click.option("--eval-episodes", type=int, default=3, help="Evaluation episodes per method and seed (same seeds).")
@click.option("--speed-steps", type=int, default=2048, help="Env steps for the speed measurement (0: skip).")
@click.option("--speed-algo", default=None, help="Algorithm of the speed measurement; default: the first learner.")
@click.option("--quality/--no-quality", default=True, help="Run the learning-quality comparison.")
@click.option("--set", "set_", multiple=True, metavar="KEY=VALUE", help="Scenario parameter override.")
@click.option(
    "--algo-set",
    "algo_set",
    multiple=True,
    metavar="KEY=VALUE",
    help="Algorithm hyper-parameter for every learner (and the speed run).",
)
@click.option("--out", default=None, help="Output directory; default results/bench-learn-<scenario>-<time>.")
def command(
    scenario: str,
    methods: str,
    steps: int | None,
    seeds: int,
    jobs: int,
    baselines: str,
    eval_episodes: int,
    speed_steps: int,
    speed_algo: str | None,
    quality: bool,
    set_: tuple[str, ...],
    algo_set: tuple[str, ...],
    out: str | None,
) -> None:
    """Learning speed (train vs env steps/s) and quality (learners over seeds vs every classical
    controller, same evaluation episodes, marl report's statistics) on SCENARIO."""
    import os

    from rich.console import Console

    from marl.core import registry
    from marl.core.config import PROCESSES_PER_CORE, parse_sets
    from marl.core.errors import ConfigError
    from marl.results.io import atomic_write_json, atomic_write_text

    console, err = Console(), Console(stderr=True)
    overrides, algo_overrides = parse_sets(set_), parse_sets(algo_set)
    spec = registry.scenario_spec(scenario)
    cfg = registry.scenario_config(scenario, overrides)
    learners = _learners(methods, scenario)
    steps = spec.training.steps if steps is None else steps
    names = (
        list(registry.controllers_for(scenario))
        if baselines.strip() == "all"
        else [b.strip() for b in baselines.split(",") if b.strip()]
    )
    for b in names:
        registry.scenario_controller(scenario, b)
    most = PROCESSES_PER_CORE * (os.cpu_count() or 1)
    if steps < 1 or eval_episodes < 1 or speed_steps < 0 or seeds < 1 or not 1 <= jobs <= most:
        raise ConfigError(
            f"bad budget (--steps {steps}, --eval-episodes {eval_episodes}, --seeds {seeds}, "
            f"--speed-steps {speed_steps}, --jobs {jobs}); allowed: steps, episodes, seeds >= 1, "
            f"speed steps >= 0, jobs 1..{most}"
        )
    out_dir = (
        Path(out)
        if out
        else Path("results") / f"bench-learn-{scenario.replace('/', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    episode_steps = None
    if hasattr(cfg, "end") and hasattr(cfg, "begin") and hasattr(cfg, "delta_time"):
        episode_steps = int((cfg.end - cfg.begin) // cfg.delta_time)

    speed = None
    if speed_steps:  # alone, before the parallel jobs, so nothing else competes for the cores
        algo = speed_algo or learners[0][0]
        with err.status(f"speed: {speed_steps} steps of env alone, then {algo} training, then env again"):
            speed = measure_speed(scenario, overrides, algo, "none", speed_steps, algo_overrides, 0, out_dir)
        console.print(
            f"speed: env {speed['env_steps_per_second']:.1f} steps/s, training "
            f"{speed['train_steps_per_second']:.1f} steps/s, ratio {speed['ratio']:.2f} (target >= 0.7); "
            f"env share of training time {speed['env_time_fraction']:.2f}"
        )
    report, done = "", []
    if quality:
        plan = plan_jobs(scenario, learners, names, seeds, steps, eval_episodes, out_dir, set_, algo_set)
        err.print(f"quality: {len(plan)} jobs, {jobs} at a time, into {out_dir}")

        def say(d: dict[str, Any]) -> None:
            status = "ok" if d["exit_code"] == 0 else f"FAILED (exit {d['exit_code']}, {d['log']})"
            err.print(f"{d['job']}: {status} {d['seconds']:.0f} s", markup=False, highlight=False)

        done = run_jobs(plan, jobs, on_done=say)
        from marl.results.cells import merge_cells

        if merge_cells(out_dir)[0]:
            from marl.commands.report import build_report

            report, _ = build_report(out_dir, formats=["md", "csv"], metrics=[], figures=True)
    failed = [d for d in done if d["exit_code"] != 0]
    text = _markdown(speed, report, scenario, steps, seeds, episode_steps, failed)
    atomic_write_json(
        out_dir / "learn_bench.json",
        {
            "speed": speed,
            "jobs": done,
            "steps": steps,
            "seeds": seeds,
            "episode_steps": episode_steps,
            "methods": [f"{a}+{p}" if p != "none" else a for a, p in learners],
            "baselines": names,
        },
    )
    atomic_write_text(out_dir / "learn_bench.md", text)
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    console.print(f"written: {out_dir / 'learn_bench.md'}")
