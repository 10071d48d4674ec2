"""``marl bench grid SCENARIO``: env steps/s on lightsim2grid against the same step on pandapower.

The reference is the MAPDN way of stepping a grid env: write the injections into the pandapower
net and call ``runpp``. Both runs use the *same* env code (``GridVoltageEnv``, or
``DemandResponseEnv`` for ``grid/demand-response``, whose batteries go through the same solver)
and differ only in ``solver=lightsim2grid|pandapower``, so the ratio is the cost of the power
flow path and nothing else. ``--set`` changes the scenario for both (``--set
feeder=1-LV-rural2--0-sw`` benches demand response with 99 households). Both see the same
seeded random actions; the voltages of every bus after every reference step are compared with
the lightsim2grid run (max |dV|). A solver-only ratio (one solve of the same injections) is
printed too. Rounds alternate the two runs and keep each one's best, which
damps the noise of a shared machine.
"""

from __future__ import annotations

import time
from typing import Any

import click

from marl.options import set_option

__all__ = ["command", "env_rate"]


def _actions(env: Any, steps: int, seed: int) -> list[dict[str, Any]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = env.action_space(env.possible_agents[0]).shape
    return [
        dict(zip(env.possible_agents, rng.uniform(-1, 1, (len(env.possible_agents), *shape)).astype(np.float32)))
        for _ in range(steps)
    ]


def env_rate(env: Any, actions: list[dict[str, Any]], seed: int, record: bool = False) -> tuple[float, list[Any]]:
    """Env steps/s over ``actions`` (reset when an episode ends); with ``record``, the bus voltages
    and the injections of the last solve after each step."""
    voltages = []
    env.reset(seed=seed)
    start = time.perf_counter()
    for a in actions:
        env.step(a)
        if record:
            voltages.append((env.pf.vm.copy(), tuple(x.copy() for x in env._inj)))
        if not env.agents:
            env.reset()
    return len(actions) / (time.perf_counter() - start), voltages


@click.command("grid")
@click.argument("scenario", default="grid/mv-rural")
@click.option("--steps", type=int, default=2000, help="lightsim2grid env steps per round.")
@click.option("--ref-steps", type=int, default=100, help="pandapower (runpp) env steps per round.")
@click.option("--rounds", type=int, default=3, help="Alternating rounds; the best of each is kept.")
@click.option("--seed", type=int, default=0)
@click.option("--out", default=None, help="Also write the figures as JSON to this file.")
@set_option
def command(
    scenario: str, steps: int, ref_steps: int, rounds: int, seed: int, out: str | None, set_: tuple[str, ...]
) -> None:
    """Env steps/s of a grid SCENARIO with lightsim2grid vs pandapower runpp, and max |dV| between them."""
    import numpy as np
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from marl.bench.common import require_domain
    from marl.core.config import parse_sets
    from marl.core.errors import ConfigError
    from marl.core.registry import make_scenario
    from marl.results.io import atomic_write_json

    if steps < 1 or ref_steps < 1 or rounds < 1:
        raise ConfigError("bad --steps/--ref-steps/--rounds; expected integers >= 1")
    require_domain(scenario, "grid")
    console = Console()
    overrides = parse_sets(set_)
    fast = make_scenario(scenario, {**overrides, "split": "all"})
    ref = make_scenario(scenario, {**overrides, "split": "all", "solver": "pandapower"})
    actions = _actions(fast, max(steps, ref_steps), seed)
    fast_rates, ref_rates, dv = [], [], 0.0
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("alternating rounds", total=rounds)
        for r in range(rounds):
            rate, v_ref = env_rate(ref, actions[:ref_steps], seed + r, record=True)
            ref_rates.append(rate)
            _, v_fast = env_rate(fast, actions[:ref_steps], seed + r, record=True)
            dv = max(dv, *(float(np.abs(a[0] - b[0]).max()) for a, b in zip(v_fast, v_ref)))
            fast_rates.append(env_rate(fast, actions[:steps], seed + r)[0])
            progress.advance(task)

    # Solver only: the injections of the recorded steps in order (lightsim2grid warm-starts from
    # the previous one, as in the env), one solve each.
    injections = [x[1] for x in v_fast]
    fast.pf.reset()
    start = time.perf_counter()
    for inj in injections:
        fast.pf.solve(*inj)
    t_fast = (time.perf_counter() - start) / len(injections)
    few = injections[: min(10, len(injections))]
    start = time.perf_counter()
    for inj in few:
        ref.pf.solve(*inj)
    t_ref = (time.perf_counter() - start) / len(few)

    best_fast, best_ref = max(fast_rates), max(ref_rates)
    figures = {
        "scenario": scenario,
        "agents": len(fast.possible_agents),
        "buses": fast.feeder.n_bus,
        "env_steps_per_s_lightsim2grid": best_fast,
        "env_steps_per_s_pandapower": best_ref,
        "env_step_ratio": best_fast / best_ref,
        "solve_ms_lightsim2grid": t_fast * 1e3,
        "solve_ms_pandapower": t_ref * 1e3,
        "solve_ratio": t_ref / t_fast,
        "max_abs_dv_pu": dv,
        "compared_steps": ref_steps * rounds,
    }
    table = Table(title=f"marl bench grid {scenario} ({figures['agents']} agents, {figures['buses']} buses)")
    for col in ("measure", "lightsim2grid", "pandapower runpp", "ratio"):
        table.add_column(col)
    table.add_row(
        "env steps/s (best of rounds)", f"{best_fast:,.0f}", f"{best_ref:,.1f}", f"{best_fast / best_ref:,.0f}x"
    )
    table.add_row("one power flow, ms", f"{t_fast * 1e3:.3f}", f"{t_ref * 1e3:.2f}", f"{t_ref / t_fast:,.0f}x")
    console.print(table)
    console.print(f"max |dV| over {ref_steps * rounds} compared steps, every bus: {dv:.2e} p.u.")
    ok = figures["env_step_ratio"] >= 100 and best_fast >= 1000 and dv <= 1e-6
    console.print(
        f"targets (>=100x per step, >=1000 env steps/s, |dV|<=1e-6): {'met' if ok else 'NOT met'}"
        " (absolute steps/s depend on the machine's load)"
    )
    fast.close()
    ref.close()
    if out:
        atomic_write_json(out, figures)
