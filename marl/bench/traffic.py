"""``marl bench traffic SCENARIO``: the env's overhead over raw SUMO, and its speed vs sumo-rl.

Three timings of one episode of the same net, routes, window and SUMO seed, each in its own
spawned process (libsumo holds one simulation per process):

* ``env``    — Concord's env driving the net's fixed-time programme (``control=program``): the
  traffic is identical to the raw run; it also reads lanes, builds observations and rewards every
  decision and parses the KPIs from tripinfo at the end;
* ``raw``    — plain libsumo: ``start`` with the same command line (incl. tripinfo output),
  ``simulationStep()`` once per simulated second, ``close`` (with random phases: the same
  phase sequence set by bare ``setRedYellowGreenState`` calls);
* ``sumo-rl``— sumo-rl's ``SumoEnvironment`` on libsumo, ``fixed_ts=True``, same decision
  interval (its default observation and reward);
* ``random phases`` — env (agents mode) and sumo-rl again, every light given the same seeded
  random phase sequence in both (so the traffic is close), which exercises yellow transitions.

The table prints CPU and wall seconds and ratios; ``env/raw`` is the env's overhead,
``sumo-rl/env`` its speed-up. Ratios use process CPU time by default (libsumo runs in-process,
so it includes SUMO's work, and it is robust to other jobs on a shared machine). Each method runs
``--repeat`` episodes back to back in its own spawned process and the fastest counts: the first
episode of a process also pays one-time costs (lazy imports, parsing the net), the steady state
is what training and evaluation runs see.

``--vector K`` measures instead the rollout throughput of :class:`scenarios.vector.SubprocVectorEnv`
(K simulations in K worker processes, random allowed phases) against K=1: wall seconds for
``--vector-steps`` decisions of every copy, and decisions (light-steps) per second. Worker start-up
is not timed; episodes restart inside the timed loop as in training. The CPU seconds the workers
spend per copy show whether the vector env adds work (it should not): on a machine with fewer
free cores than copies, the wall-clock gain shrinks although the CPU per copy stays the same.

``--later N`` measures the cost of reproducible later episodes: N episodes back to back on one env
(random allowed phases, seeds 1..N) with each backend in its own spawned process: every simulation
in the process's libsumo (``fresh_sumo=false``: fastest, but episodes after the first depend on the
process's memory history), the default (the first in-process, later ones in a libsumo child forked
from a clean zygote), and a fresh ``sumo`` over TraCI per episode (``use_libsumo=false``). It prints
the wall seconds of the first and the later episodes and their ratio to in-process libsumo's (wall
time: the forked child's work is not this process's CPU), and whether the later episodes' delays
equal TraCI's (fresh processes: the reproducible reference).

``--train-envs K`` measures Concord's own training, ``marl train SCENARIO --algo ippo --envs K``
(``--train-algo`` for another learner), against ``--envs 1`` in the same run: each run is a
separate ``marl train`` process of ``--train-steps`` env steps (no evaluation), and its manifest
gives env-steps per second of rollout + update (``steps_per_second``), of the rollout alone
(``rollout_steps_per_second``; none for an off-policy learner, which acts and learns in one loop)
and the share of time spent waiting for the simulations, and the CPU milliseconds per env step of
the training process and its env workers together (equal for K=1 and K: no added work).
Agent-samples per second = env-steps per second x agents. Start-up (workers, first reset) is not timed. ``--repeat`` runs alternate
K=1, K, K=1, K, ... and the fastest of each counts; the load average is printed with the table,
since the gain needs free cores.
"""

from __future__ import annotations

import os
import time
from typing import Any

import click

__all__ = ["command", "time_env", "time_later", "time_raw", "time_sumo_rl", "time_train", "time_vector"]


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _elapsed(start: tuple[float, float]) -> dict[str, float]:
    """Wall and CPU seconds since ``start``. libsumo runs inside the process, so its CPU time
    counts SUMO's work too and is far less disturbed by other jobs on the machine than wall time."""
    return {"wall": time.perf_counter() - start[0], "cpu": time.process_time() - start[1]}


def time_env(scenario: str, overrides: dict[str, Any], actions: str = "program") -> dict[str, Any]:
    """Seconds for construct + reset + full episode + KPIs of the env.

    ``actions="program"`` runs the net's own programme (traffic identical to ``time_raw``);
    ``"random"`` lets every light pick a random allowed phase each decision (seeded).
    """
    from marl.core import registry
    from scenarios.traffic import env as _env_module  # noqa: F401  imports are not timed
    from scenarios.traffic.nets import import_sumo

    cfg = registry.scenario_config(scenario, overrides)
    import_sumo(True)
    n_steps = -(-(cfg.end - cfg.begin) // cfg.delta_time)
    table_rows = _random_table(registry.scenario_spec(scenario).n_agents or 64, n_steps)
    start = _clock()
    control = "program" if actions == "program" else "agents"
    env = registry.make_scenario(scenario, {**overrides, "control": control})
    try:
        steps = _play(env, table_rows, actions, seed=0)
        kpis = env.episode_kpis()
    finally:
        env.close()
    return {**_elapsed(start), "kpis": kpis, "steps": steps}


def _play(env: Any, table_rows: list[list[int]], actions: str, seed: int) -> int:
    """Reset ``env`` with ``seed`` and play one episode to its end; the number of decisions.

    ``actions="program"`` leaves the lights to the env's control mode; otherwise the i-th light
    picks ``table_rows[i][step] % n_phases`` at each decision (the same sequence as sumo-rl's run).
    """
    env.reset(seed=seed)
    # possible_agents (light_<i>) follow the sorted SUMO ids, sumo-rl's order
    table = {a: table_rows[i] for i, a in enumerate(env.possible_agents)}
    n_phases = {a: s.n_phases for a, s in env.signals.items()}
    steps = 0
    while env.agents:
        if actions == "program":
            env.step({})
        else:
            env.step({a: table[a][steps] % n_phases[a] for a in env.agents})
        steps += 1
    return steps


#: ``--later``'s backends: name, scenario overrides.
LATER_BACKENDS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("libsumo in-process (fresh_sumo=false)", {"fresh_sumo": False}),
    ("default: later ones in forked libsumo", {}),
    ("fresh sumo over TraCI (use_libsumo=false)", {"use_libsumo": False}),
)


def time_later(scenario: str, overrides: dict[str, Any], episodes: int) -> dict[str, Any]:
    """Wall seconds and delay of each of ``episodes`` back-to-back episodes on one env (random
    allowed phases, seeds 1..N; construction and imports not timed)."""
    from marl.core import registry

    cfg = registry.scenario_config(scenario, overrides)
    n_steps = -(-(cfg.end - cfg.begin) // cfg.delta_time)
    table_rows = _random_table(registry.scenario_spec(scenario).n_agents or 64, n_steps)
    env = registry.make_scenario(scenario, {**overrides, "control": "agents"})
    walls, delays = [], []
    try:
        for k in range(episodes):
            start = time.perf_counter()
            _play(env, table_rows, "random", seed=k + 1)
            walls.append(time.perf_counter() - start)
            delays.append(env.episode_kpis()["delay"])
    finally:
        env.close()
    return {"walls": walls, "delays": delays}


def time_raw(scenario: str, overrides: dict[str, Any], actions: str = "program") -> dict[str, Any]:
    """Seconds for libsumo start + one simulationStep() per second + close, same command line.

    ``actions="random"`` also sets the same phase sequence as the env's random run with bare
    ``setRedYellowGreenState`` calls (yellow, then green), reading nothing: the floor for the
    env's agents mode.
    """
    import tempfile
    from pathlib import Path

    from marl.core import registry
    from scenarios.traffic.env import parse_tripinfo, sumo_command
    from scenarios.traffic.nets import import_sumo, read_net, resolve_path

    cfg = registry.scenario_config(scenario, overrides)
    net = resolve_path(cfg.net_file, "net_file")
    signals = read_net(str(net), float(cfg.neighbour_max_m)).signals
    n_steps = -(-(cfg.end - cfg.begin) // cfg.delta_time)
    rows = _random_table(len(signals), n_steps)
    plan = [(tl, signals[tl], rows[i]) for i, tl in enumerate(sorted(signals))]
    with tempfile.TemporaryDirectory(prefix="concord-bench-") as tmp:
        tripinfo, stats = Path(tmp) / "tripinfo.xml", Path(tmp) / "statistics.xml"
        cmd = sumo_command(
            net, resolve_path(cfg.route_file, "route_file"),
            cfg.begin, cfg.end, 0, tripinfo=tripinfo, statistics=stats,
        )  # fmt: skip
        libsumo = import_sumo(True)
        start = _clock()
        libsumo.start(cmd)
        if actions == "program":
            for _ in range(cfg.end - cfg.begin):
                libsumo.simulationStep()
        else:
            set_state = libsumo.trafficlight.setRedYellowGreenState
            green = dict.fromkeys(signals, 0)
            ready = cfg.yellow_time + cfg.min_green  # a change needs this many s in the phase
            since = dict.fromkeys(signals, ready)
            for tl, sig, _ in plan:
                set_state(tl, sig.phases[0])
            t, step = cfg.begin, 0
            while t < cfg.end:
                target = min(t + cfg.delta_time, cfg.end)
                change = [(tl, sig, row[step] % sig.n_phases) for tl, sig, row in plan]
                change = [(tl, sig, p) for tl, sig, p in change if p != green[tl] and since[tl] >= ready]
                for tl in since:
                    since[tl] += target - t
                for tl, _, _ in change:
                    since[tl] = target - t
                for tl, sig, p in change:
                    set_state(tl, sig.transition(green[tl], p))
                for _ in range(min(cfg.yellow_time, target - t) if change else 0):
                    libsumo.simulationStep()
                    t += 1
                for tl, sig, p in change:
                    set_state(tl, sig.phases[p])
                    green[tl] = p
                while t < target:
                    libsumo.simulationStep()
                    t += 1
                step += 1
        libsumo.close()
        times = _elapsed(start)
        kpis = parse_tripinfo(tripinfo, stats)
    return {**times, "kpis": kpis}


def time_sumo_rl(scenario: str, overrides: dict[str, Any], actions: str = "program") -> dict[str, Any]:
    """Seconds for sumo-rl's SumoEnvironment on libsumo over the same episode.

    ``actions="program"`` uses ``fixed_ts=True`` (the net's programme); ``"random"`` random phases.
    """
    from marl.core import registry
    from scenarios.traffic.nets import resolve_path, sumo_home

    cfg = registry.scenario_config(scenario, overrides)
    sumo_home()
    os.environ["LIBSUMO_AS_TRACI"] = "1"  # sumo-rl picks libsumo at import time
    from sumo_rl import SumoEnvironment

    n_steps = -(-(cfg.end - cfg.begin) // cfg.delta_time)
    table_rows = _random_table(registry.scenario_spec(scenario).n_agents or 64, n_steps)
    start = _clock()
    env = SumoEnvironment(
        net_file=str(resolve_path(cfg.net_file, "net_file")),
        route_file=str(resolve_path(cfg.route_file, "route_file")),
        begin_time=cfg.begin,
        num_seconds=cfg.end - cfg.begin,
        delta_time=cfg.delta_time,
        yellow_time=cfg.yellow_time,
        min_green=cfg.min_green,
        fixed_ts=actions == "program",
        sumo_seed=0,
        sumo_warnings=False,
        single_agent=False,
    )
    env.reset()
    table = {ts: table_rows[i] for i, ts in enumerate(sorted(env.ts_ids))}
    n_phases = {ts: env.action_spaces(ts).n for ts in env.ts_ids}
    steps = 0
    while True:
        if actions == "program":
            act: dict[str, int] = {}
        else:
            act = {ts: table[ts][steps] % n_phases[ts] for ts in env.ts_ids}
        *_, dones, _ = env.step(act)
        steps += 1
        if dones["__all__"]:
            break
    env.close()
    return {**_elapsed(start), "steps": steps}


def time_vector(scenario: str, overrides: dict[str, Any], copies: int, steps: int) -> dict[str, Any]:
    """Wall seconds for ``steps`` decisions in each of ``copies`` simulations stepped together.

    Actions are random allowed phases (seeded); the clock starts after every worker has reset.
    """
    import numpy as np

    from scenarios.vector import SubprocVectorEnv

    vec = SubprocVectorEnv(scenario, copies, overrides=overrides)
    try:
        rng = np.random.default_rng(0)
        _, infos = vec.reset(seed=0)
        cpu_start = sum(vec.worker_cpu_seconds())
        start = time.perf_counter()
        for _ in range(steps):
            actions = [int(rng.choice(np.flatnonzero(i["action_mask"]))) for i in infos]
            *_, infos = vec.step(np.array(actions))
        wall = time.perf_counter() - start
        worker_cpu = sum(vec.worker_cpu_seconds()) - cpu_start
    finally:
        vec.close()
    decisions = steps * vec.num_envs
    return {"copies": copies, "wall": wall, "decisions_per_s": decisions / wall, "lights": vec.num_agents,
            "worker_cpu": worker_cpu}  # fmt: skip


def time_train(
    scenario: str, overrides: dict[str, Any], envs: int, steps: int, out: str, algo: str = "ippo"
) -> dict[str, Any]:
    """Run ``marl train SCENARIO --algo ALGO --envs ENVS --steps STEPS`` as its own process (no
    preset: the algorithm's bare defaults, no evaluation) and return its manifest's throughput
    (an off-policy learner acts and learns in one loop: no rollout-only rate, NaN)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from marl.core.errors import ConcordError

    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-c", "import sys; from marl.cli import main; sys.exit(main())", "train", scenario,
           "--no-preset", "--algo", algo, "--envs", str(envs), "--steps", str(steps), "--eval-episodes", "0",
           "--algo-set", "eval_every=0", "--out", out, *sets]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ConcordError(f"marl train --envs {envs} failed (exit {done.returncode}): {last}")
    manifest = json.loads(next(iter(sorted((Path(out) / "manifests").glob("*.json")))).read_text())
    agents = len(manifest["layout"]["agents"])
    return {
        "envs": envs,
        "agents": agents,
        "updates": manifest["updates_completed"],
        "steps_per_s": manifest["steps_per_second"],
        "samples_per_s": manifest["steps_per_second"] * agents,
        "rollout_steps_per_s": manifest.get("rollout_steps_per_second", float("nan")),
        "env_fraction": manifest.get("env_time_fraction") or float("nan"),
        "seconds": manifest["train_seconds"],
        # CPU of the training process and its env workers per env step (start-up excluded)
        "cpu_ms_per_step": 1000 * sum(manifest["cpu_seconds"].values()) / manifest["env_steps"],
    }


def _random_table(n_lights: int, n_steps: int) -> list[list[int]]:
    """Seeded random integers [light][decision], drawn before the clock starts. Env and sumo-rl
    both pick phase ``table[i][step] % n_phases`` for the i-th light in sorted id order, so both
    runs see the same phase sequence and (nearly) the same traffic."""
    import numpy as np

    return np.random.default_rng(0).integers(0, 2**31, size=(n_lights, n_steps + 2)).tolist()


def _fastest(fn: Any, args: tuple[Any, ...], episodes: int, clock: str) -> dict[str, Any]:
    """Run ``fn(*args)`` ``episodes`` times in this process; the fastest run by ``clock``."""
    runs = [fn(*args) for _ in range(episodes)]
    return min(runs, key=lambda r: r[clock])


def _spawned(fn: Any, args: tuple[Any, ...]) -> Any:
    """``fn(*args)`` in a fresh spawned process: libsumo allows one simulation per process, its
    first simulation is the process's first, and no method inherits another's warm caches."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


@click.command("traffic")
@click.argument("scenario", default="traffic/grid4x4")
@click.option("--horizon", type=int, default=None, help="simulated seconds (default: the full episode)")
@click.option(
    "--repeat",
    type=int,
    default=3,
    help="episodes per method, run back to back in its process; the fastest counts",
)
@click.option("--skip-sumo-rl", is_flag=True, help="time only the env and raw SUMO")
@click.option(
    "--vector",
    "vector",
    type=int,
    default=None,
    help="time the vector env with this many copies (worker processes) against 1 copy",
)
@click.option("--vector-steps", type=int, default=200, help="decisions per copy timed with --vector")
@click.option(
    "--train-envs",
    type=int,
    default=None,
    help="time 'marl train --algo ippo --envs K' against --envs 1 (env-steps/s, agent-samples/s, rollout only)",
)
@click.option("--train-steps", type=int, default=1440, help="env steps per training run timed with --train-envs")
@click.option("--train-algo", default="ippo", help="algorithm timed with --train-envs (bare defaults, no preset)")
@click.option(
    "--later",
    type=int,
    default=None,
    help="time N back-to-back episodes per backend (in-process libsumo, forked libsumo, TraCI): later episodes' cost",
)
@click.option(
    "--clock",
    type=click.Choice(["cpu", "wall"]),
    default="cpu",
    help="what the ratios use: process CPU time (robust on a shared machine) or wall time",
)
def command(
    scenario: str,
    horizon: int | None,
    repeat: int,
    skip_sumo_rl: bool,
    vector: int | None,
    vector_steps: int,
    train_envs: int | None,
    train_steps: int,
    train_algo: str,
    later: int | None,
    clock: str,
) -> None:
    """Time one episode: Concord env vs raw libsumo vs sumo-rl (each in its own process)."""
    from rich.console import Console
    from rich.table import Table

    from marl.bench.common import require_domain
    from marl.core import registry
    from marl.core.errors import ConfigError

    if repeat < 1:
        raise ConfigError(f"bad --repeat {repeat}; expected an integer >= 1")
    require_domain(scenario, "traffic")
    base = registry.scenario_config(scenario)
    overrides: dict[str, Any] = {}
    if horizon is not None:
        if horizon < 1:
            raise ConfigError(f"bad --horizon {horizon}; expected an integer >= 1")
        overrides["end"] = base.begin + horizon
    if vector is not None:
        _vector_table(scenario, overrides, vector, vector_steps)
        return
    if train_envs is not None:
        _train_table(scenario, overrides, train_envs, train_steps, repeat, train_algo)
        return
    if later is not None:
        _later_table(scenario, overrides, later)
        return
    methods: list[tuple[str, Any, str]] = [
        ("raw libsumo, fixed-time", time_raw, "program"),
        ("env, fixed-time", time_env, "program"),
        ("sumo-rl, fixed-time", time_sumo_rl, "program"),
        ("raw libsumo, random phases", time_raw, "random"),
        ("env, random phases", time_env, "random"),
        ("sumo-rl, random phases", time_sumo_rl, "random"),
    ]
    if skip_sumo_rl:
        methods = [m for m in methods if not m[0].startswith("sumo-rl")]
    console = Console()
    best: dict[str, dict[str, Any]] = {}
    with console.status("timing...") as status:
        for name, fn, actions in methods:
            status.update(f"{name}: {repeat} episode(s)")
            best[name] = _spawned(_fastest, (fn, (scenario, overrides, actions), repeat, clock))
    shown = base.end - base.begin if horizon is None else horizon
    title = f"{scenario}: one episode of {shown} simulated s, decisions every {base.delta_time} s"
    table = Table(title=title)
    for col in ("method", "cpu s", "wall s", f"x raw ({clock})"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, _, _ in methods:
        r = best[name]
        raw = best["raw libsumo, " + name.split(", ", 1)[1]][clock]
        table.add_row(name, f"{r['cpu']:.3f}", f"{r['wall']:.3f}", f"{r[clock] / raw:.3f}")
    console.print(table)
    for mode in ("fixed-time", "random phases"):
        raw = best[f"raw libsumo, {mode}"][clock]
        line = f"{mode}: env / raw libsumo {best[f'env, {mode}'][clock] / raw:.3f}x"
        if f"sumo-rl, {mode}" in best:
            ratio = best[f"sumo-rl, {mode}"][clock] / best[f"env, {mode}"][clock]
            line += f"; sumo-rl / env {ratio:.2f}x"
        console.print(line)
    for mode in ("fixed-time", "random phases"):
        env_k, raw_k = best[f"env, {mode}"]["kpis"], best[f"raw libsumo, {mode}"]["kpis"]
        same = all(env_k[k] == raw_k[k] for k in raw_k)
        console.print(
            f"identical traffic, {mode} (tripinfo KPIs env == raw): {'yes' if same else 'NO'} "
            f"(delay {env_k['delay']:.2f} s vs {raw_k['delay']:.2f} s)"
        )
    if "sumo-rl, random phases" in best:
        console.print("sumo-rl gets the same phase sequences; its traffic is close, not identical")


def _vector_table(scenario: str, overrides: dict[str, Any], copies: int, steps: int) -> None:
    """Print the rollout throughput of 1 and ``copies`` simulations stepped together."""
    from rich.console import Console
    from rich.table import Table

    from marl.core.errors import ConfigError

    if copies < 1 or steps < 1:
        raise ConfigError(f"bad --vector {copies} / --vector-steps {steps}; expected integers >= 1")
    console = Console()
    rows = []
    with console.status("timing the vector env..."):
        for k in sorted({1, copies}):
            rows.append(time_vector(scenario, overrides, k, steps))
    table = Table(title=f"{scenario}: {steps} decisions per copy, random allowed phases ({os.cpu_count()} CPUs)")
    for col in ("copies", "wall s", "light-decisions/s", "x 1 copy", "worker CPU s per copy"):
        table.add_column(col, justify="right")
    for r in rows:
        ratio = r["decisions_per_s"] / rows[0]["decisions_per_s"]
        per_copy = r["worker_cpu"] / r["copies"]
        table.add_row(
            str(r["copies"]), f"{r['wall']:.2f}", f"{r['decisions_per_s']:.0f}", f"{ratio:.2f}", f"{per_copy:.2f}"
        )
    console.print(table)
    console.print(
        "equal worker CPU per copy means no vector-env overhead: wall-clock gains need as many free "
        f"cores as copies (load average now {os.getloadavg()[0]:.1f})"
    )


def _train_table(scenario: str, overrides: dict[str, Any], envs: int, steps: int, repeat: int, algo: str) -> None:
    """Print the training throughput of ``marl train --algo algo --envs envs`` against ``--envs 1``."""
    import tempfile

    from rich.console import Console
    from rich.table import Table

    from marl.core.errors import ConfigError

    if envs < 1 or steps < 1:
        raise ConfigError(f"bad --train-envs {envs} / --train-steps {steps}; expected integers >= 1")
    console = Console()
    console = Console(width=max(console.width, 150))  # nine columns: never truncate a header
    load_before = os.getloadavg()
    best: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp, console.status("timing marl train...") as status:
        for i in range(repeat):
            for k in sorted({1, envs}):  # alternate, so a change in the machine's load hits both
                status.update(f"marl train {scenario} --envs {k} ({i + 1}/{repeat})")
                r = time_train(scenario, overrides, k, steps, f"{tmp}/{i}-{k}", algo)
                if k not in best or r["steps_per_s"] > best[k]["steps_per_s"]:
                    best[k] = r
    load_after = os.getloadavg()
    agents = best[1]["agents"]
    title = (f"marl train {scenario} --algo {algo} --envs K: {steps} env steps per run, {agents} agents, "
             f"fastest of {repeat} ({os.cpu_count()} CPUs)")  # fmt: skip
    table = Table(title=title)
    cols = ("K", "updates", "env-steps/s", "agent-samples/s", "x K=1", "rollout env-steps/s", "x K=1 (rollout)",
            "time in envs", "CPU ms/env-step")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="right")
    ref = best[1]
    for k in sorted(best):
        r = best[k]
        table.add_row(str(k), str(r["updates"]), f"{r['steps_per_s']:.1f}", f"{r['samples_per_s']:.0f}",
                      f"{r['steps_per_s'] / ref['steps_per_s']:.2f}", f"{r['rollout_steps_per_s']:.1f}",
                      f"{r['rollout_steps_per_s'] / ref['rollout_steps_per_s']:.2f}",
                      f"{r['env_fraction']:.0%}", f"{r['cpu_ms_per_step']:.1f}")  # fmt: skip
    console.print(table)
    console.print(
        f"load average (1, 5, 15 min) before {', '.join(f'{x:.2f}' for x in load_before)}; after "
        f"{', '.join(f'{x:.2f}' for x in load_after)}: the K-fold gain needs K free cores; equal CPU per "
        "env-step (training process + env workers) means --envs adds no work"
    )


def _later_table(scenario: str, overrides: dict[str, Any], episodes: int) -> None:
    """Print the wall time of later episodes per backend against in-process libsumo's."""
    from statistics import mean

    from rich.console import Console
    from rich.table import Table

    from marl.core.errors import ConfigError

    if not 3 <= episodes <= 100:
        raise ConfigError(f"bad --later {episodes}; expected an integer from 3 to 100 (episodes per backend)")
    console = Console()
    console = Console(width=max(console.width, 120))  # never wrap the backends' names
    load_before = os.getloadavg()
    runs: dict[str, dict[str, Any]] = {}
    with console.status("timing later episodes...") as status:
        for name, sets in LATER_BACKENDS:
            status.update(f"{name}: {episodes} episodes")
            runs[name] = _spawned(time_later, (scenario, {**overrides, **sets}, episodes))
    # episodes 3..N: the default's second episode also waits for its zygote to start (once per process)
    ref = mean(runs[LATER_BACKENDS[0][0]]["walls"][2:])
    title = f"{scenario}: {episodes} episodes back to back on one env, random phases, wall s ({os.cpu_count()} CPUs)"
    table = Table(title=title)
    for col in ("backend", "1st episode", "2nd", "3rd.. (mean)", "x in-process libsumo (3rd..)"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    for name, _ in LATER_BACKENDS:
        walls = runs[name]["walls"]
        table.add_row(
            name, f"{walls[0]:.2f}", f"{walls[1]:.2f}", f"{mean(walls[2:]):.2f}", f"{mean(walls[2:]) / ref:.2f}"
        )
    console.print(table)
    reference = runs[LATER_BACKENDS[2][0]]["delays"]  # every TraCI episode is a fresh process's
    for name, _ in LATER_BACKENDS[:2]:
        same = runs[name]["delays"] == reference
        console.print(f"delays equal a fresh sumo's in every episode, {name}: {'yes' if same else 'NO'}")
    console.print(
        f"load average (1 min) before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; the default's 2nd "
        "episode also waits for its zygote to start (once per process)"
    )
