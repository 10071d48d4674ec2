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

__all__ = ["command", "measure_ours", "measure_pogema", "ensure_pogema_python"]

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
    import numpy as np

    actions = np.random.default_rng(seed).integers(0, 5, size=(steps, env.n))
    agents = env.possible_agents
    env.reset(seed=seed)
    t0 = time.perf_counter()
    if api == "dict":
        for k in range(steps):
            if not env.agents:
                env.reset()
            env.step(dict(zip(agents, actions[k].tolist())))
    else:
        for k in range(steps):
            env.step_array(actions[k])
    return steps * env.n / (time.perf_counter() - t0)


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
    pogema_rates: list[float] = []
    pogema_version = None
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("random-action rounds", total=rounds)
        for r in range(rounds):
            ours_dict.append(measure_ours(env, steps, seed + r, api="dict"))
            ours_array.append(measure_ours(env, steps, seed + r, api="array"))
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
    for col in ("simulator", "agent-steps/s (best round)", "vs POGEMA"):
        table.add_column(col)
    best_dict, best_array = max(ours_dict), max(ours_array)
    figures.update(ours_dict_api=best_dict, ours_array_api=best_array)
    ref = max(pogema_rates) if pogema_rates else None

    def ratio(x: float) -> str:
        return f"{x / ref:.1f}x" if ref else "n/a"

    table.add_row("concord warehouse, PettingZoo step(dict)", f"{best_dict:,.0f}", ratio(best_dict))
    # step_array builds no observations or dicts, so it is not put against POGEMA's step.
    table.add_row("concord warehouse, step_array (core, no obs/dicts)", f"{best_array:,.0f}", "-")
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
    if out:
        atomic_write_json(out, figures)
        console.print(f"figures: {out}")
