"""``marl bench learn SCENARIO``: how fast training runs, and how good the trained policies are.

**Speed.** Training throughput — environment steps per second of rollout *and* PPO updates — is
put against the environment's own stepping rate with a fixed controller (the domain's ``random``
controller, through the same episode loop as ``marl run``), both measured in this process, the
reference once before and once after training (their mean), so machine load hits both alike.
``ratio = train steps/s / env steps/s``; the target is >= 0.7 (learning overhead <= 30 %).
The training run also reports the share of its own time spent inside ``env.step``/``reset``
(``1 -`` that share is the learning overhead), which does not depend on the traffic state: on
SUMO nets a random controller congests the network, which then simulates more slowly than under
a trained policy, so the ratio alone can exceed 1.

**Quality.** IPPO is trained once per protocol in ``--protocols`` (default none, neighbours,
commnet, tarmac) for ``--steps`` environment steps each, then evaluated (deterministic policy) on
the episodes of ``marl run --seed SEED --episodes E`` (``E = --eval-episodes``,
:mod:`marl.core.seeding`); the baselines in ``--baselines`` (fixed-time, max-pressure) run on the
same episodes in the same command. RESCO (Ault & Sharon 2021)
trains 100 one-hour episodes (36,000 decisions at 10 s); the budget here is whatever ``--steps``
says, printed in the table, so read the comparison in that light.

Everything is written to ``--out`` as ordinary results records (one sub-directory per method) plus
``learn_bench.json`` and ``learn_bench.md`` with the tables.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

__all__ = ["command", "env_steps_per_second", "measure_quality", "measure_speed"]


def env_steps_per_second(scenario: str, overrides: dict[str, str], controller: str, steps: int,
                         seed: int = 0, test: bool = False) -> float:
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


def measure_speed(scenario: str, overrides: dict[str, str], algo: str, protocol: str, steps: int,
                  algo_overrides: dict[str, str], seed: int, out: Path, test: bool = False) -> dict[str, Any]:
    """Training steps/s vs the env's own steps/s (random controller), same process, sandwiched."""
    from marl.core import registry
    from marl.training import TrainRequest, train

    domain = registry.scenario_spec(scenario).domain
    names = {n for (_, n) in registry.controllers(domain)}
    controller = "random" if "random" in names else registry.scenario_spec(scenario).default_controller
    before = env_steps_per_second(scenario, overrides, controller, steps, seed, test)
    result = train(TrainRequest(
        scenario=scenario, algo=algo, protocol=protocol, steps=steps, seed=seed, out=str(out / "speed"),
        overrides=overrides, algo_overrides={"eval_every": "0", **algo_overrides}, eval_episodes=0, test=test,
    ))
    after = env_steps_per_second(scenario, overrides, controller, steps, seed, test)
    reference = (before + after) / 2
    return {
        "scenario": scenario, "algo": algo, "protocol": protocol, "steps": result.env_steps,
        "reference_controller": controller, "env_steps_per_second": reference,
        "env_before": before, "env_after": after,
        "train_steps_per_second": result.steps_per_second,
        "ratio": result.steps_per_second / reference if reference else float("nan"),
        # Within the training run itself: the share of time spent stepping the env. Unlike the
        # ratio it does not depend on the traffic the two controllers create (a random controller
        # congests SUMO nets, which then simulate more slowly than under a learned policy).
        "env_time_fraction": result.env_fraction,
    }


def measure_quality(scenario: str, overrides: dict[str, str], algo: str, protocols: list[str],
                    baselines: list[str], steps: int, eval_episodes: int, seed: int,
                    algo_overrides: dict[str, str], out: Path, on_step: Any = None,
                    test: bool = False) -> list[dict[str, Any]]:
    """Train ``algo`` with each protocol, run each baseline, all scored on the same seeds."""
    import numpy as np

    from marl.core import registry
    from marl.runner import RunRequest, run
    from marl.training import TrainRequest, train

    kpi = getattr(registry.load(registry.scenario_spec(scenario).entry_point), "main_kpi", "") or "return"
    rows: list[dict[str, Any]] = []

    def summarise(method: str, episodes: list[dict[str, float]], **extra: Any) -> dict[str, Any]:
        values = np.array([e.get(kpi, np.nan) for e in episodes], dtype=float)
        returns = np.array([e["return"] for e in episodes], dtype=float)
        bytes_ = [e.get("bytes_per_agent_step", 0.0) for e in episodes]
        return {"method": method, "kpi": kpi, "mean": float(values.mean()), "std": float(values.std()),
                "return": float(returns.mean()), "bytes_per_agent_step": float(np.mean(bytes_)),
                "episodes": len(episodes), **extra}

    for name in baselines:
        t0 = time.perf_counter()
        res = run(RunRequest(scenario=scenario, controller=name, episodes=eval_episodes, seed=seed,
                             out=str(out / name), overrides=overrides, test=test))
        rows.append(summarise(name, res.episodes, train_steps=0, seconds=time.perf_counter() - t0))
        if on_step:
            on_step(rows[-1])
    for protocol in protocols:
        t0 = time.perf_counter()
        result = train(TrainRequest(
            scenario=scenario, algo=algo, protocol=protocol, steps=steps, seed=seed,
            out=str(out / f"{algo}-{protocol}"), overrides=overrides, algo_overrides=algo_overrides,
            eval_episodes=eval_episodes, test=test,
        ))
        from marl.results.records import read_records

        frame = read_records(result.out_dir)
        final = frame[(frame.run_id == result.run_id) & (~frame.metric.str.startswith(("train_", "eval_")))]
        episodes = [dict(zip(g.metric, g.value)) for _, g in final.groupby("episode")]
        rows.append(summarise(result.method, episodes, train_steps=result.env_steps,
                              seconds=time.perf_counter() - t0, train_steps_per_second=result.steps_per_second))
        if on_step:
            on_step(rows[-1])
    return rows


def _markdown(speed: dict[str, Any] | None, quality: list[dict[str, Any]], scenario: str, steps: int,
              episode_steps: int | None) -> str:
    lines = [f"# marl bench learn {scenario}", ""]
    if speed is not None:
        lines += [
            "## Speed (same process; reference = env with the "
            f"`{speed['reference_controller']}` controller, mean of before/after)", "",
            "| algo | protocol | steps | env steps/s | train steps/s | ratio (target >= 0.7) "
            "| env share of training time |",
            "|---|---|---|---|---|---|---|",
            f"| {speed['algo']} | {speed['protocol']} | {speed['steps']} | {speed['env_steps_per_second']:.1f} "
            f"| {speed['train_steps_per_second']:.1f} | {speed['ratio']:.2f} | {speed['env_time_fraction']:.2f} |", "",
        ]
    if quality:
        kpi = quality[0]["kpi"]
        budget = f"{steps} env steps per learner"
        if episode_steps:
            budget += f" (= {steps / episode_steps:.1f} episodes of {episode_steps} decisions; RESCO: 100)"
        lines += [f"## Quality: {kpi} on the same evaluation seeds; training budget {budget}", "",
                  f"| method | {kpi} mean | std | return | bytes/agent/step | train steps | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for r in quality:
            lines.append(f"| {r['method']} | {r['mean']:.2f} | {r['std']:.2f} | {r['return']:.2f} | "
                         f"{r['bytes_per_agent_step']:.0f} | {r['train_steps']} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


@click.command("learn", context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("scenario")
@click.option("--algo", default="ippo", help="Learning algorithm.")
@click.option("--steps", type=int, default=18_000, help="Training budget per protocol (env steps).")
@click.option("--protocols", default="none,neighbours,commnet,tarmac", help="Comma-separated protocols to train with.")
@click.option("--baselines", default="fixed-time,max-pressure", help="Comma-separated baseline controllers.")
@click.option("--eval-episodes", type=int, default=3, help="Evaluation episodes per method (same seeds).")
@click.option("--speed-steps", type=int, default=2048, help="Env steps for the speed measurement (0: skip).")
@click.option("--speed-protocol", default="none", help="Protocol used in the speed measurement.")
@click.option("--quality/--no-quality", default=True, help="Run the learning-quality comparison.")
@click.option("--seed", type=int, default=0, help="Seed (training and evaluation).")
@click.option("--set", "set_", multiple=True, metavar="KEY=VALUE", help="Scenario parameter override.")
@click.option("--algo-set", "algo_set", multiple=True, metavar="KEY=VALUE", help="Algorithm hyper-parameter.")
@click.option("--out", default=None, help="Output directory; default results/bench-learn-<scenario>-<time>.")
def command(scenario: str, algo: str, steps: int, protocols: str, baselines: str, eval_episodes: int,
            speed_steps: int, speed_protocol: str, quality: bool, seed: int, set_: tuple[str, ...],
            algo_set: tuple[str, ...], out: str | None) -> None:
    """Learning speed (train vs env steps/s) and quality (IPPO + protocols vs baselines) on SCENARIO."""
    from rich.console import Console
    from rich.markdown import Markdown

    from marl.core import registry
    from marl.core.config import parse_sets
    from marl.core.errors import ConfigError
    from marl.results.io import atomic_write_json, atomic_write_text
    from marl.training import algorithm_config

    console, err = Console(), Console(stderr=True)
    overrides, algo_overrides = parse_sets(set_), parse_sets(algo_set)
    spec = registry.scenario_spec(scenario)
    cfg = registry.scenario_config(scenario, overrides)
    algorithm_config(algo, algo_overrides)
    proto_list = [p.strip() for p in protocols.split(",") if p.strip()]
    base_list = [b.strip() for b in baselines.split(",") if b.strip()]
    for p in [*proto_list, speed_protocol]:
        registry.protocol_spec(p)
    for b in base_list:
        registry.controller_spec(spec.domain, b)
    if steps < 1 or eval_episodes < 1 or speed_steps < 0:
        raise ConfigError("bad budget: --steps and --eval-episodes must be >= 1, --speed-steps >= 0")
    out_dir = Path(out) if out else Path("results") / f"bench-learn-{scenario.replace('/', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    episode_steps = None
    if hasattr(cfg, "end") and hasattr(cfg, "begin") and hasattr(cfg, "delta_time"):
        episode_steps = int((cfg.end - cfg.begin) // cfg.delta_time)

    speed = None
    if speed_steps:
        with err.status(f"speed: {speed_steps} steps of env alone, then training, then env again"):
            speed = measure_speed(scenario, overrides, algo, speed_protocol, speed_steps, algo_overrides,
                                  seed, out_dir)
        console.print(f"speed: env {speed['env_steps_per_second']:.1f} steps/s, training "
                      f"{speed['train_steps_per_second']:.1f} steps/s, ratio {speed['ratio']:.2f} (target >= 0.7); "
                      f"env share of training time {speed['env_time_fraction']:.2f}")
    rows: list[dict[str, Any]] = []
    if quality:
        from rich.progress import Progress

        with Progress(console=err, transient=True) as progress:
            task = progress.add_task("quality", total=len(base_list) + len(proto_list))
            rows = measure_quality(
                scenario, overrides, algo, proto_list, base_list, steps, eval_episodes, seed, algo_overrides,
                out_dir, on_step=lambda r: (progress.advance(task),
                                            err.print(f"{r['method']}: {r['kpi']} {r['mean']:.2f}")),
            )
    report = _markdown(speed, rows, scenario, steps, episode_steps)
    atomic_write_json(out_dir / "learn_bench.json", {"speed": speed, "quality": rows, "steps": steps,
                                                     "episode_steps": episode_steps, "seed": seed})
    atomic_write_text(out_dir / "learn_bench.md", report)
    console.print(Markdown(report))
    console.print(f"written: {out_dir / 'learn_bench.md'}")
