"""``marl bench warehouse SCENARIO``: simulator speed against POGEMA, and planner throughput.

Three figures, measured in one run on this machine:

1. **Our env**, random actions through the PettingZoo ``step(dict)`` API (the path learners and
   ``marl run`` use) and through the vectorised ``step_array`` core, in agent-steps per second.
2. **POGEMA** (Skrynnik et al., "POGEMA: A Benchmark Platform for Cooperative Multi-Agent
   Pathfinding", ICLR 2025; pip package ``pogema``) on *the same floor* (racks and walls become
   POGEMA obstacles), the same number of agents, the same observation radius, lifelong targets
   (``on_target="restart"``), random actions. POGEMA pins old gymnasium/pydantic/numpy, so it
   can never share the main venv: it runs in a subprocess of a separate venv,
   ``.venv-pogema`` at the repository root (or ``--pogema-python``), which this benchmark
   creates on first use with ``python -m venv`` + ``pip install pogema``. If that fails the
   benchmark says so and still reports our own rate. Rounds alternate between the two
   simulators and the best round of each is kept, so machine load hits both alike.
3. **Planner**: the ``prioritized`` controller (WHCA*) on ``warehouse/large``: env steps per
   second including planning, and deliveries per step.
4. **Planner curve** (``--curve 500,1000,...``): deliveries per step of a planner (``--curve-
   controller``, default ``rolling``) on SCENARIO as the number of robots grows, against
   ``random`` on the same episodes (the reference), over ``--curve-steps`` steps: the whole
   episode and its second half (after the first deliveries), planning seconds per step, the
   share of robot-steps the planner planned, and the process's peak RSS. Table, JSON and a figure
   go to ``--curve-out`` (``<stem>.md/.json/.png``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

__all__ = ["command", "measure_ours", "measure_pogema", "ensure_pogema_python", "planner_curve", "parse_robots"]

#: Most robots one curve size may ask for (the env also refuses more robots than free cells).
MAX_CURVE_ROBOTS = 100_000

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_POGEMA_VENV = REPO_ROOT / ".venv-pogema"

# Runs inside the POGEMA venv; reads its job as JSON on stdin, prints one RESULT line.
_POGEMA_SCRIPT = r"""
import json, sys, time
import numpy as np
import pogema
from pogema import GridConfig, pogema_v0
job = json.loads(sys.stdin.read())
cfg = GridConfig(map=job["map"], num_agents=job["agents"], obs_radius=job["obs_radius"],
                 on_target="restart", max_episode_steps=job["steps"] + 10, seed=job["seed"])
env = pogema_v0(grid_config=cfg)
env.reset(seed=job["seed"])
actions = np.random.default_rng(job["seed"]).integers(0, 5, size=(job["steps"], job["agents"]))
rates = []
for _ in range(job["rounds"]):
    env.reset(seed=job["seed"])
    t0 = time.perf_counter()
    for k in range(job["steps"]):
        env.step(actions[k].tolist())
    rates.append(job["steps"] * job["agents"] / (time.perf_counter() - t0))
print("RESULT " + json.dumps({"rates": rates, "version": pogema.__version__}))
"""


def measure_ours(env: Any, steps: int, seed: int, *, api: str = "dict") -> float:
    """Agent-steps per second of ``env`` under uniform random actions (``api``: dict | array)."""
    return measure_rates(env, steps, seed, api=api)[0]


def measure_rates(env: Any, steps: int, seed: int, *, api: str = "dict") -> tuple[float, float]:
    """:func:`measure_ours` per wall second and per CPU second of this process (the CPU rate
    is what a machine shared with other jobs disturbs least)."""
    import numpy as np

    actions = np.random.default_rng(seed).integers(0, 5, size=(steps, env.n))
    agents = env.possible_agents
    env.reset(seed=seed)
    c0 = time.process_time()
    t0 = time.perf_counter()
    if api == "dict":
        for k in range(steps):
            if not env.agents:
                env.reset()
            env.step(dict(zip(agents, actions[k].tolist())))
    else:
        for k in range(steps):
            env.step_array(actions[k])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return steps * env.n / wall, steps * env.n / max(cpu, 1e-9)


def ensure_pogema_python(python: str | None, console: Any) -> Path | None:
    """The interpreter of a venv with pogema; creates ``.venv-pogema`` if needed. None on failure."""
    if python:
        path = Path(python)
        if not path.exists():
            console.print(f"[red]--pogema-python {python} does not exist; skipping POGEMA[/red]")
            return None
        return path
    venv = Path(os.environ.get("CONCORD_POGEMA_VENV", DEFAULT_POGEMA_VENV))
    exe = venv / "bin" / "python"
    probe = [str(exe), "-c", "import pogema"]
    if exe.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return exe
    console.print(f"creating {venv} with pogema (one time; it needs PyPI) ...")
    try:
        if not exe.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
        subprocess.run([str(exe), "-m", "pip", "install", "-q", "pogema"], check=True, capture_output=True, timeout=900)
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        last = detail.decode(errors="replace").strip().splitlines()[-1:] or [str(exc)]
        console.print(
            f"[red]could not create the POGEMA venv at {venv}: {last[0]}[/red]\n"
            "POGEMA needs its own venv (it pins old gymnasium/pydantic/numpy); create it by hand with\n"
            f"  python3 -m venv {venv} && {exe} -m pip install pogema\n"
            "or pass --pogema-python. Reporting our own rate only."
        )
        return None
    return exe


def measure_pogema(
    python: Path, map_rows: list[str], agents: int, obs_radius: int, steps: int, rounds: int, seed: int
) -> dict[str, Any] | None:
    """Run POGEMA in ``python``'s venv; returns ``{"rates": [...], "version": ...}`` or None."""
    job = {
        "map": "\n".join(map_rows),
        "agents": agents,
        "obs_radius": obs_radius,
        "steps": steps,
        "rounds": rounds,
        "seed": seed,
    }
    proc = subprocess.run(
        [str(python), "-c", _POGEMA_SCRIPT], input=json.dumps(job), capture_output=True, text=True, timeout=1800
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    sys.stderr.write(proc.stderr[-2000:])
    return None


def parse_robots(text: str) -> list[int]:
    """Robot counts of ``--curve`` (comma-separated, at least 2, each 1..MAX_CURVE_ROBOTS)."""
    from marl.core.errors import ConfigError

    labels = [x.strip() for x in text.split(",") if x.strip()]
    if len(labels) < 2 or not all(x.isdigit() and 1 <= int(x) <= MAX_CURVE_ROBOTS for x in labels):
        raise ConfigError(
            f"bad --curve '{text}'; expected at least 2 comma-separated robot counts in 1..{MAX_CURVE_ROBOTS}"
        )
    return [int(x) for x in labels]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _episode(scenario: str, robots: int, steps: int, controller: str, seed: int) -> dict[str, Any]:
    """One episode of ``controller`` with ``robots`` robots; KPIs plus timing and planner stats."""
    from marl.core.registry import make_scenario
    from marl.runner import build_controller

    env = make_scenario(scenario, {"n_robots": robots, "horizon": steps})
    ctrl = build_controller(scenario, controller, env)
    obs, _ = env.reset(seed=seed)
    ctrl.reset(env, seed)
    act_s = 0.0
    start = time.perf_counter()
    while env.agents:
        t0 = time.perf_counter()
        actions = ctrl.act(obs, env)
        act_s += time.perf_counter() - t0
        obs, *_ = env.step(actions)
    wall = time.perf_counter() - start
    kpis = env.episode_kpis()
    delivered = env.task_table()["delivered"]
    half = steps // 2
    stats = getattr(ctrl, "stats", {})
    return {
        "robots": robots,
        "controller": controller,
        "throughput": kpis["throughput"],
        "throughput_2nd_half": float(((delivered > half) & (delivered <= steps)).sum()) / max(steps - half, 1),
        "deliveries": kpis["deliveries"],
        "conflicts_per_robot_step": kpis["conflicts"] / (steps * robots),
        "act_s_per_step": act_s / steps,
        "wall_s": wall,
        "planned_share": stats["planned"] / (steps * robots) if "planned" in stats else None,
        "peak_rss_mb": peak_rss_mb(),
    }


def planner_curve(
    scenario: str, robots: list[int], steps: int, controller: str, seed: int, on_size: Any = None
) -> list[dict[str, Any]]:
    """Rows of :func:`_episode` for ``controller`` and ``random`` at each robot count."""
    rows = []
    for n in robots:
        for name in (controller, "random"):
            if on_size is not None:
                on_size(f"{name}, {n} robots")
            rows.append(_episode(scenario, n, steps, name, seed))
    return rows


def write_curve(rows: list[dict[str, Any]], scenario: str, controller: str, steps: int, stem: Path) -> list[Path]:
    """``stem``.md (table), .json (rows) and .png (deliveries per step against robots)."""
    from marl.results.io import atomic_write_bytes
    from marl.results.plots import _pyplot, save_figure

    ours = [r for r in rows if r["controller"] == controller]
    ref = {r["robots"]: r for r in rows if r["controller"] == "random"}
    lines = [
        f"| robots | {controller} deliveries/step | 2nd half | random | 2nd half | vs random | planned share | "
        "act s/step | conflicts per robot-step | peak RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ours:
        base = ref[r["robots"]]
        ref_rate = base["throughput_2nd_half"]
        times = f"{r['throughput_2nd_half'] / ref_rate:.0f}x" if ref_rate else "random: none"
        share = "-" if r["planned_share"] is None else f"{r['planned_share']:.3f}"
        lines.append(
            f"| {r['robots']} | {r['throughput']:.3f} | {r['throughput_2nd_half']:.3f} | {base['throughput']:.3f} | "
            f"{base['throughput_2nd_half']:.3f} | {times} | {share} | {r['act_s_per_step']:.3f} | "
            f"{r['conflicts_per_robot_step']:.3f} | {r['peak_rss_mb']:.0f} |"
        )
    head = f"{scenario}, {steps} steps per episode, seed as given; deliveries per step (whole episode, 2nd half)\n\n"
    stem.parent.mkdir(parents=True, exist_ok=True)
    files = [
        atomic_write_bytes(stem.with_suffix(".md"), (head + "\n".join(lines) + "\n").encode()),
        atomic_write_bytes(
            stem.with_suffix(".json"), json.dumps({"scenario": scenario, "rows": rows}, indent=1).encode()
        ),
    ]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for name, style in ((controller, "-o"), ("random", "--s")):
        pts = [r for r in rows if r["controller"] == name]
        xs = [r["robots"] for r in pts]
        ax.plot(xs, [r["throughput_2nd_half"] for r in pts], style, label=f"{name}, 2nd half")
        ax.plot(xs, [r["throughput"] for r in pts], style, alpha=0.4, label=f"{name}, whole episode")
    ax.set_xscale("log")
    ax.set_xlabel("robots")
    ax.set_ylabel("deliveries per step")
    ax.set_title(f"{scenario}: throughput as robots grow ({steps} steps)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return files + save_figure(fig, stem.parent, stem.name)


def _run_curve(
    console: Any, scenario: str, robots: list[int], steps: int, controller: str, seed: int, out: str
) -> list[dict[str, Any]]:
    """:func:`planner_curve` with a status line; prints the table and writes its files."""
    with console.status("") as status:
        rows = planner_curve(
            scenario,
            robots,
            steps,
            controller,
            seed,
            on_size=lambda label: status.update(f"planner curve: {label} ..."),
        )
    files = write_curve(rows, scenario, controller, steps, Path(out))
    click.echo(Path(out).with_suffix(".md").read_text())
    console.print("wrote " + ", ".join(str(f) for f in files))
    return rows


def _pogema_map(env: Any) -> list[str]:
    """Our floor as POGEMA rows: every cell robots cannot use becomes '#'."""
    lay = env.layout
    free = lay.passable.reshape(lay.height, lay.width)
    return ["".join("." if f else "#" for f in row) for row in free]


@click.command("warehouse")
@click.argument("scenario", default="warehouse/large")
@click.option("--steps", type=int, default=2000, help="Random-action steps per round.")
@click.option("--rounds", type=int, default=3, help="Alternating rounds; the best of each simulator is kept.")
@click.option("--seed", type=int, default=0)
@click.option("--pogema/--no-pogema", "with_pogema", default=True, help="Also measure POGEMA side by side.")
@click.option("--pogema-python", default=None, help="Python of a venv with pogema (default: .venv-pogema, created).")
@click.option(
    "--view-radius", type=int, default=None, help="Observation radius for both simulators (default: the scenario's)."
)
@click.option(
    "--planner-steps", type=int, default=500, help="Steps of the prioritized planner on warehouse/large (0: skip)."
)
@click.option("--out", default=None, help="Also write the figures as JSON to this file.")
@click.option(
    "--curve", default=None, help="Robot counts for the planner curve on SCENARIO, e.g. 500,1000,2000,5000,10000."
)
@click.option("--curve-steps", type=int, default=600, help="Steps per episode of the planner curve.")
@click.option("--curve-controller", default="rolling", help="Controller of the planner curve (against random).")
@click.option(
    "--curve-out", default="results/bench-warehouse-curve", help="Path stem of the curve's .md/.json/.png files."
)
def command(
    scenario: str,
    steps: int,
    rounds: int,
    seed: int,
    with_pogema: bool,
    pogema_python: str | None,
    view_radius: int | None,
    planner_steps: int,
    out: str | None,
    curve: str | None,
    curve_steps: int,
    curve_controller: str,
    curve_out: str,
) -> None:
    """Agent-steps/s of SCENARIO with random actions vs POGEMA on the same floor, and the WHCA* planner's
    throughput on warehouse/large."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from marl.bench.common import require_domain
    from marl.core.errors import ConfigError
    from marl.core.registry import make_scenario
    from marl.results.io import atomic_write_json
    from marl.runner import build_controller

    if steps < 1 or rounds < 1 or planner_steps < 0:
        raise ConfigError(
            "bad --steps/--rounds/--planner-steps; expected --steps >= 1, --rounds >= 1, --planner-steps >= 0"
        )
    require_domain(scenario, "warehouse")
    robots = parse_robots(curve) if curve is not None else []
    if curve_steps < 2:
        raise ConfigError(f"bad --curve-steps {curve_steps}; expected an integer >= 2")
    if robots:
        from marl.core.registry import scenario_controller

        scenario_controller(scenario, curve_controller)  # an unknown controller fails before any run
    console = Console()
    overrides: dict[str, Any] = {"horizon": steps}
    if view_radius is not None:
        overrides["view_radius"] = view_radius
    env = make_scenario(scenario, overrides)
    n = env.n
    figures: dict[str, Any] = {"scenario": scenario, "robots": n, "cells": env.layout.n_cells, "steps": steps}

    python = ensure_pogema_python(pogema_python, console) if with_pogema else None
    ours_dict: list[float] = []
    ours_array: list[float] = []
    cpu_dict: list[float] = []
    cpu_array: list[float] = []
    pogema_rates: list[float] = []
    pogema_version = None
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("random-action rounds", total=rounds)
        for r in range(rounds):
            wall, cpu = measure_rates(env, steps, seed + r, api="dict")
            ours_dict.append(wall)
            cpu_dict.append(cpu)
            wall, cpu = measure_rates(env, steps, seed + r, api="array")
            ours_array.append(wall)
            cpu_array.append(cpu)
            if python is not None:
                res = measure_pogema(python, _pogema_map(env), n, env.config.view_radius, steps, 1, seed + r)
                if res is None:
                    console.print("[red]POGEMA run failed (stderr above); reporting our rate only[/red]")
                    python = None
                else:
                    pogema_rates.append(max(res["rates"]))
                    pogema_version = res["version"]
            progress.advance(task)

    table = Table(title=f"{scenario}: {n} robots, {env.layout.n_cells} cells, random actions", header_style="bold")
    for col in ("simulator", "agent-steps/s (best round)", "vs POGEMA", "per CPU s"):
        table.add_column(col)
    best_dict, best_array = max(ours_dict), max(ours_array)
    figures.update(ours_dict_api=best_dict, ours_array_api=best_array)
    figures.update(ours_dict_api_cpu=max(cpu_dict), ours_array_api_cpu=max(cpu_array))
    ref = max(pogema_rates) if pogema_rates else None

    def ratio(x: float) -> str:
        return f"{x / ref:.1f}x" if ref else "n/a"

    cpu_best = f"{max(cpu_dict):,.0f}", f"{max(cpu_array):,.0f}"
    table.add_row("concord warehouse, PettingZoo step(dict)", f"{best_dict:,.0f}", ratio(best_dict), cpu_best[0])
    # step_array builds no observations or dicts, so it is not put against POGEMA's step.
    table.add_row("concord warehouse, step_array (core, no obs/dicts)", f"{best_array:,.0f}", "-", cpu_best[1])
    if ref:
        table.add_row(
            f"POGEMA {pogema_version} (same floor, obs radius {env.config.view_radius})", f"{ref:,.0f}", "1.0x"
        )
        figures.update(pogema=ref, pogema_version=pogema_version, ratio_dict_api=best_dict / ref)
    else:
        table.add_row("POGEMA", "not measured", "")
    console.print(table)

    if planner_steps > 0:
        large = make_scenario("warehouse/large", {"horizon": planner_steps})
        controller = build_controller("warehouse/large", "prioritized", large)
        obs, _ = large.reset(seed=seed)
        controller.reset(large, seed)
        t0 = time.perf_counter()
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("prioritized planner on warehouse/large", total=planner_steps)
            while large.agents:
                obs, *_ = large.step(controller.act(obs, large))
                progress.advance(task)
        elapsed = time.perf_counter() - t0
        kpis = large.episode_kpis()
        figures["planner"] = {"steps_per_s": planner_steps / elapsed, "seconds": elapsed, **kpis}
        console.print(
            f"prioritized (WHCA*) on warehouse/large, {planner_steps} steps: {elapsed:.1f} s "
            f"({planner_steps / elapsed:.0f} steps/s, {planner_steps * large.n / elapsed:,.0f} agent-steps/s); "
            f"throughput {kpis['throughput']:.3f} deliveries/step, deadlock steps {kpis['deadlock_steps']:.0f}"
        )
    if robots:
        figures["curve"] = _run_curve(console, scenario, robots, curve_steps, curve_controller, seed, curve_out)
    figures["peak_rss_mb"] = peak_rss_mb()
    console.print(f"peak RSS of this process: {figures['peak_rss_mb']:.0f} MiB")
    if out:
        atomic_write_json(out, figures)
        console.print(f"figures: {out}")
