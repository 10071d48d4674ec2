"""``marl bench scale DOMAIN``: how the cost of one step grows with the number of agents.

For five or more growing team sizes of one domain (``traffic``, ``grid``, ``warehouse``, or
``comms`` — synthetic agents on a graph, no simulator) this measures the cost **per agent-step**,
in microseconds of process CPU time, of

* ``env``      — ``env.step(actions)`` through the PettingZoo API (actions drawn before timing:
  uniform random for discrete and box spaces; traffic runs the nets' own signal programme,
  ``control=program``, so that the traffic equals the raw run), after ``--warmup`` untimed steps
  (traffic: 300 s, the time the generated grids take to fill);
* ``raw``      — traffic only: plain libsumo, ``simulationStep()`` once per simulated second over
  the same simulated window, same net, routes, seed and command line (the env's floor; the
  ``env/raw`` column is the env's overhead, as ``marl bench traffic`` reports for one map);
  ``veh/light`` = mean vehicles in the net per light over that window (SUMO's cost follows it);
* ``comms``    — the channel plus a protocol exchange: :class:`comms.runtime.CommsRuntime` with
  ``--protocol`` (default ``neighbours``) over ``--channel`` (default 10 % loss) on the
  scenario's topology (comms: a random 4-regular graph), one payload of 8 floats per agent;
  ``msg/s`` = messages delivered per CPU second of those exchanges, ``degree`` = mean
  neighbours per agent in that topology (the neighbours protocol's work grows with it);
* ``policy``   — one forward pass of :class:`marl.policies.ActorCritic` (shared 64x64 actor and
  critic, agent ids, as IPPO builds it) for all agents of a step: action sampling and value;
* ``update``   — one PPO update (:func:`marl.algos.ppo.ppo_update`, 2 epochs x 2 mini-batches)
  on a synthetic rollout of ``--rollout`` steps of all agents, per agent-step of that rollout.

It prints the table and, per column, the log-log slope of the **total cost of a step** (per
agent-step cost x agents) against agents, fitted by least squares over the sizes: 1.0 means
cost linear in agents (flat per agent), 2.0 quadratic. The issue's target: env + comms slope
<= 1.1. The figure (``scale_<domain>.png``/``.pdf``) and the table (``scale_<domain>.csv``, JSON)
go to ``--out``.

Torch runs on one thread, and times are process CPU seconds: a 2-core machine shared with other
jobs disturbs CPU time far less than wall time, and per-agent costs stay comparable across sizes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

__all__ = ["DOMAINS", "Size", "command", "default_sizes", "loglog_slope", "measure", "parse_sizes", "slopes"]

DOMAINS = ("traffic", "grid", "warehouse", "comms")
#: Columns timed per agent-step (``raw`` only for traffic), in table order.
COLUMNS = ("env", "raw", "comms", "policy", "update")
PAYLOAD = 8  #: floats each agent sends per step in the comms column
#: Default sizes (the ``--sizes`` spelling of each domain; see :func:`parse_sizes`).
DEFAULT_SIZES = {
    "traffic": "2x2,4x4,6x6,10x10,14x14,20x20",
    "grid": "ieee33,lv-rural,1-LV-rural3--0-sw,mv-rural,1-MV-semiurb--0-sw,1-MV-urban--0-sw,hvmv-urban",
    "warehouse": "small,medium,large,xl:1000,xl:3000,xl",
    "comms": "100,300,1000,3000,10000",
}


@dataclass
class Size:
    """One team size: a label, the scenario and overrides that build it (None for comms)."""

    label: str
    scenario: str | None
    overrides: dict[str, Any] = field(default_factory=dict)
    agents: int = 0  #: comms: given; otherwise read from the env when it is built


def default_sizes(domain: str) -> str:
    """The default ``--sizes`` text of ``domain``."""
    return DEFAULT_SIZES[domain]


def parse_sizes(domain: str, text: str) -> list[Size]:
    """Sizes from their ``--sizes`` spelling, checked before anything runs.

    traffic: ``RxC`` generated grids (``generated/gridRxC-seed0``, the recipe of
    traffic/grid10x10); grid: a grid scenario name (``ieee33``, ``lv-rural``, ``mv-rural``) or a
    SimBench code (``1-MV-urban--0-sw``, on mv-rural's settings; LV codes on lv-rural's);
    warehouse: ``small``/``medium``/``large``/``xl`` or ``MAP:ROBOTS`` (``xl:3000``: the xl floor
    with 3,000 robots); comms: agent counts.
    """
    from marl.core import registry
    from marl.core.errors import ConfigError

    if domain not in DOMAINS:
        from marl.core.errors import unknown

        raise unknown("scale domain", domain, DOMAINS)
    labels = [s.strip() for s in text.split(",") if s.strip()]
    if len(labels) < 2:
        raise ConfigError(f"bad --sizes '{text}'; expected at least 2 comma-separated sizes to fit a slope")
    sizes = []
    for label in labels:
        if domain == "comms":
            if not label.isdigit() or int(label) < 2:
                raise ConfigError(f"bad comms size '{label}'; expected an agent count >= 2")
            sizes.append(Size(label, None, agents=int(label)))
        elif domain == "traffic":
            rows, _, cols = label.partition("x")
            if not (rows.isdigit() and cols.isdigit()):
                raise ConfigError(f"bad traffic size '{label}'; expected ROWSxCOLS, e.g. 10x10")
            path = f"generated/grid{int(rows)}x{int(cols)}-seed0"
            from scenarios.traffic.nets import parse_generated

            parse_generated(f"{path}/grid.net.xml", "traffic size")  # checks the grid size
            overrides = {"net_file": f"{path}/grid.net.xml", "route_file": f"{path}/grid.rou.xml"}
            sizes.append(Size(label, "traffic/grid10x10", {**overrides, "control": "program"}))
        elif domain == "grid":
            if f"grid/{label}" in registry.scenarios("grid"):
                sizes.append(Size(label, f"grid/{label}"))
            else:
                from scenarios.grid.feeder import feeder_names

                if label not in feeder_names():  # checked now, not after the earlier sizes ran
                    from marl.core.errors import unknown

                    names = [s.split("/")[1] for s in registry.scenarios("grid")]
                    raise unknown("grid size (scenario or SimBench feeder)", label, [*names, *feeder_names()])
                base = "grid/lv-rural" if "-LV-" in label else "grid/mv-rural"
                sizes.append(Size(label, base, {"feeder": label}))
        else:
            name, _, robots = label.partition(":")
            if f"warehouse/{name}" not in registry.scenarios("warehouse"):
                from marl.core.errors import unknown

                raise unknown("warehouse map", name, [s.split("/")[1] for s in registry.scenarios("warehouse")])
            if robots and not robots.isdigit():
                raise ConfigError(f"bad warehouse size '{label}'; expected MAP or MAP:ROBOTS, e.g. large:400")
            sizes.append(Size(label, f"warehouse/{name}", {"n_robots": int(robots)} if robots else {}))
    return sizes


def loglog_slope(agents: list[int], cost_per_step: list[float]) -> float:
    """Least-squares slope of log(cost of a step) against log(agents); NaN with < 2 usable points."""
    import numpy as np

    pts = [(n, c) for n, c in zip(agents, cost_per_step) if n > 0 and c > 0 and math.isfinite(c)]
    if len({n for n, _ in pts}) < 2:
        return float("nan")
    x = np.log([n for n, _ in pts])
    y = np.log([c for _, c in pts])
    return float(np.polyfit(x, y, 1)[0])


def slopes(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Log-log slope of the total cost of a step (us per agent-step x agents) per column, plus
    ``env+comms`` (the issue's target) and ``total`` (every column but raw)."""
    agents = [r["agents"] for r in rows]
    out = {}
    for col in (*COLUMNS, "env+comms", "total"):
        out[col] = loglog_slope(agents, [r.get(col, float("nan")) * r["agents"] for r in rows])
    return out


def _cpu() -> float:
    return time.process_time()


def _actions(env: Any, steps: int, seed: int) -> list[dict[str, Any]]:
    """``steps`` action dicts drawn before timing: uniform over each agent's space."""
    import numpy as np
    from gymnasium import spaces

    rng = np.random.default_rng(seed)
    agents = env.possible_agents
    space = env.action_space(agents[0])
    if isinstance(space, spaces.Discrete):
        draws = rng.integers(0, int(space.n), size=(steps, len(agents)))
        return [dict(zip(agents, row.tolist())) for row in draws]
    if isinstance(space, spaces.Box):
        low, high = space.low.astype(np.float64), space.high.astype(np.float64)
        return [{a: rng.uniform(low, high).astype(space.dtype) for a in agents} for _ in range(steps)]
    raise TypeError(f"no random actions for {type(space).__name__} spaces")


def _time_env(env: Any, steps: int, warmup: int, seed: int, program: bool) -> float:
    """CPU seconds of ``steps`` env steps after ``warmup`` untimed ones (episode ends reset,
    untimed)."""
    actions = _actions(env, warmup + steps, seed)
    env.reset(seed=seed)
    spent = 0.0
    for k in range(warmup + steps):
        if not env.agents:
            env.reset()
        act = {} if program else actions[k]
        start = _cpu()
        env.step(act)
        if k >= warmup:
            spent += _cpu() - start
    return spent


def _time_raw(env: Any, steps: int, warmup: int, seed: int) -> tuple[float, float]:
    """CPU seconds of plain libsumo over the simulated seconds the env's timed steps covered,
    and the mean number of vehicles in the net then (read once per decision interval)."""
    import tempfile

    from scenarios.traffic.env import sumo_command
    from scenarios.traffic.nets import import_sumo, resolve_path

    cfg = env.config
    libsumo = import_sumo(True)
    with tempfile.TemporaryDirectory(prefix="concord-scale-") as tmp:
        cmd = sumo_command(
            resolve_path(cfg.net_file, "net_file"), resolve_path(cfg.route_file, "route_file"), cfg.begin, cfg.end, seed,
            tripinfo=Path(tmp) / "tripinfo.xml", statistics=Path(tmp) / "statistics.xml",
        )  # fmt: skip
        libsumo.start(cmd)
        try:
            for _ in range(warmup * cfg.delta_time):
                libsumo.simulationStep()
            count = libsumo.vehicle.getIDCount
            vehicles = 0
            start = _cpu()
            for _ in range(steps):
                for _ in range(cfg.delta_time):
                    libsumo.simulationStep()
                vehicles += count()
            return _cpu() - start, vehicles / steps
        finally:
            libsumo.close()


def _time_comms(
    agents: list[str], topology: Any, reps: int, protocol: str, channel: str, seed: int
) -> tuple[float, float]:
    """CPU seconds per exchange of ``protocol`` over ``channel`` (mean over ``reps``) and
    messages delivered per CPU second."""
    import numpy as np

    from comms.runtime import build_comms

    runtime = build_comms(protocol, channel, agents, PAYLOAD, seed)
    runtime.reset(topology)
    rng = np.random.default_rng(seed)
    payloads = [dict(zip(agents, rng.random((len(agents), PAYLOAD)))) for _ in range(min(reps, 4))]
    runtime.exchange(payloads[0])  # first call indexes the topology
    before = runtime.channel.totals()["messages_delivered"]
    start = _cpu()
    for k in range(reps):
        runtime.exchange(payloads[k % len(payloads)])
    spent = _cpu() - start
    delivered = runtime.channel.totals()["messages_delivered"] - before
    return spent / reps, delivered / spent if spent > 0 else float("nan")


def _model(n: int, obs_dim: int, action_space: Any) -> Any:
    from gymnasium import spaces

    from marl.policies import ActionSpec, ActorCritic

    if isinstance(action_space, spaces.Discrete):
        spec = ActionSpec("discrete", int(action_space.n))
    else:
        size = int(math.prod(action_space.shape))
        spec = ActionSpec("continuous", size, tuple(map(float, action_space.low.flat)),
                          tuple(map(float, action_space.high.flat)))  # fmt: skip
    return ActorCritic(n_agents=n, obs_dim=obs_dim, critic_dim=obs_dim, action=spec)


def _time_policy(model: Any, n: int, obs_dim: int, reps: int) -> float:
    """CPU seconds of one forward pass for all ``n`` agents (sample actions + values)."""
    import torch

    obs = torch.rand(1, n, obs_dim)
    with torch.no_grad():
        model.actor(obs, None)[0].sample()  # warm-up (allocator, kernels)
        start = _cpu()
        for _ in range(reps):
            dist, _ = model.actor(obs, None)
            dist.sample()
            model.value(obs)
        return (_cpu() - start) / reps


@dataclass
class _PPO:
    """PPO settings of the timed update (CleanRL's defaults, fewer epochs)."""

    update_epochs: int = 2
    num_minibatches: int = 2
    clip_coef: float = 0.2
    clip_vloss: bool = True
    norm_adv: bool = True
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    target_kl: float | None = None


def _time_update(model: Any, n: int, obs_dim: int, rollout: int, seed: int) -> float:
    """CPU seconds of one PPO update on a synthetic rollout of ``rollout`` steps of ``n`` agents."""
    import torch

    from marl.algos.ppo import Batch, ppo_update
    from marl.policies import log_prob_entropy

    gen = torch.Generator().manual_seed(seed)
    obs = torch.rand(rollout, n, obs_dim, generator=gen)
    with torch.no_grad():
        dist, _ = model.actor(obs, None)
        actions = dist.sample()
        logprobs, _ = log_prob_entropy(dist, actions)
        values = model.value(obs)
    batch = Batch(
        obs=obs, critic_in=obs, delivered=None, action_mask=None, actions=actions, gates=None,
        logprobs=logprobs, values=values, advantages=torch.randn(rollout, n, generator=gen),
        returns=values + torch.randn(rollout, n, generator=gen),
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4, eps=1e-5)
    start = _cpu()
    ppo_update(model, optimizer, batch, _PPO(), generator=gen)
    return _cpu() - start


def measure(
    domain: str,
    sizes: list[Size],
    *,
    steps: int,
    warmup: int,
    reps: int,
    rollout: int,
    protocol: str = "neighbours",
    channel: str = "drop=0.1",
    seed: int = 0,
    on_size: Any = None,
) -> list[dict[str, Any]]:
    """One row per size: agents and microseconds per agent-step of each column (see the module
    docstring); ``env/raw`` for traffic. ``on_size(label)`` is called before each size."""
    import torch

    from marl.core import registry

    torch.set_num_threads(1)
    rows = []
    for size in sizes:
        if on_size is not None:
            on_size(size.label)
        row: dict[str, Any] = {"size": size.label}
        if size.scenario is None:  # comms: synthetic agents on a random 4-regular graph
            from marl.bench.comms import make_graph

            n = size.agents
            agents = [f"a{i}" for i in range(n)]
            topology = make_graph("4-regular", n, seed) if n > 4 else make_graph("ring", n)
            obs_dim, action_space = 16, None
        else:
            env = registry.make_scenario(size.scenario, size.overrides)
            try:
                n = len(env.possible_agents)
                agents = list(env.possible_agents)
                program = domain == "traffic"
                row["env"] = _time_env(env, steps, warmup, seed, program) / (steps * n)
                topology = env.topology
                obs_dim = int(math.prod(env.observation_space(agents[0]).shape))
                action_space = env.action_space(agents[0])
            finally:
                env.close()
            if domain == "traffic":
                raw, vehicles = _time_raw(env, steps, warmup, seed)
                row["raw"] = raw / (steps * n)
                row["veh/light"] = vehicles / n
                row["env/raw"] = row["env"] / row["raw"] if row["raw"] > 0 else float("nan")
        row["agents"] = n
        row["degree"] = 2 * topology.number_of_edges() / max(n, 1)  # neighbours per agent
        per_exchange, row["msg/s"] = _time_comms(agents, topology, reps, protocol, channel, seed)
        row["comms"] = per_exchange / n
        from gymnasium import spaces

        model = _model(n, obs_dim, action_space or spaces.Discrete(5))
        row["policy"] = _time_policy(model, n, obs_dim, reps) / n
        row["update"] = _time_update(model, n, obs_dim, rollout, seed) / (rollout * n)
        row["env+comms"] = row.get("env", 0.0) + row["comms"]
        row["total"] = row["env+comms"] + row["policy"] + row["update"]
        for key in (*COLUMNS, "env+comms", "total"):
            if key in row:
                row[key] *= 1e6  # seconds -> microseconds
        rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]], domain: str, fitted: dict[str, float], directory: Path) -> list[Path]:
    """Log-log figure: microseconds per agent-step of each column against agents."""
    from marl.results.plots import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    agents = [r["agents"] for r in rows]
    for i, col in enumerate((*COLUMNS, "total")):
        ys = [r.get(col) for r in rows]
        if any(y is None for y in ys):
            continue
        style = "--" if col == "raw" else "-"
        ax.plot(agents, ys, style, marker="osD^vP"[i % 6], color=f"C{i}", label=f"{col} (slope {fitted[col]:.2f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("agents")
    ax.set_ylabel("CPU us per agent-step")
    ax.set_title(f"marl bench scale {domain}: slope of step cost vs agents", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return save_figure(fig, directory, f"scale_{domain}")


def write_table(rows: list[dict[str, Any]], fitted: dict[str, float], domain: str, directory: Path) -> list[Path]:
    """``scale_<domain>.csv`` (one row per size) and ``scale_<domain>.json`` (rows + slopes), atomically."""
    import csv
    import io

    from marl.results.io import atomic_write_bytes

    keys = ["size", "agents", *COLUMNS, "env/raw", "env+comms", "total", "msg/s", "degree", "veh/light"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") for k in keys})
    doc = {"domain": domain, "unit": "CPU microseconds per agent-step", "rows": rows, "slopes": fitted}
    return [
        atomic_write_bytes(directory / f"scale_{domain}.csv", buf.getvalue().encode()),
        atomic_write_bytes(directory / f"scale_{domain}.json", json.dumps(doc, indent=1).encode()),
    ]


@click.command("scale")
@click.argument("domain", metavar="DOMAIN")
@click.option(
    "--sizes",
    default=None,
    help="Comma-separated sizes (at least 2). traffic: ROWSxCOLS generated grids; grid: scenario names or "
    "SimBench codes; warehouse: MAP or MAP:ROBOTS; comms: agent counts. Default: "
    + "; ".join(f"{d} {v}" for d, v in DEFAULT_SIZES.items()),
)
@click.option("--steps", type=int, default=30, help="Timed env steps per size (after --warmup).")
@click.option("--warmup", type=int, default=30, help="Untimed env steps first (traffic: vehicles fill the net).")
@click.option("--reps", type=int, default=20, help="Timed comms exchanges and forward passes per size.")
@click.option("--rollout", type=int, default=32, help="Steps in the rollout of the timed PPO update.")
@click.option("--protocol", default="neighbours", help="Rule-based protocol of the comms column.")
@click.option("--channel", default="drop=0.1", help="Channel spec of the comms column.")
@click.option("--seed", type=int, default=0, help="Seed of actions, channel and synthetic data.")
@click.option("--out", default=None, help="Output directory; default results/bench-scale-<domain>-<time>.")
def command(
    domain: str,
    sizes: str | None,
    steps: int,
    warmup: int,
    reps: int,
    rollout: int,
    protocol: str,
    channel: str,
    seed: int,
    out: str | None,
) -> None:
    """Cost per agent-step of env, channel + protocol, policy and PPO update for growing agent
    counts of DOMAIN (traffic|grid|warehouse|comms); table, log-log slopes and a figure."""
    from rich.console import Console
    from rich.table import Table

    from comms.runtime import validate_comms
    from marl.core.errors import ConfigError

    if domain not in DOMAINS:
        from marl.core.errors import unknown

        raise unknown("scale domain", domain, DOMAINS)
    for name, value, least in (("--steps", steps, 1), ("--warmup", warmup, 0), ("--reps", reps, 1),
                               ("--rollout", rollout, 2)):  # fmt: skip
        if value < least:
            raise ConfigError(f"bad {name} {value}; expected an integer >= {least}")
    validate_comms(protocol, channel)
    plan = parse_sizes(domain, sizes or default_sizes(domain))
    directory = Path(out) if out else Path("results") / f"bench-scale-{domain}-{time.strftime('%Y%m%d-%H%M%S')}"
    import sys

    # Piped output (files, CI logs) gets a wide console instead of rich's 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 160)
    wall = time.perf_counter()
    with console.status("") as status:
        rows = measure(
            domain, plan, steps=steps, warmup=warmup, reps=reps, rollout=rollout, protocol=protocol,
            channel=channel, seed=seed, on_size=lambda label: status.update(f"scale {domain}: {label} ..."),
        )  # fmt: skip
    fitted = slopes(rows)
    table = Table(title=f"marl bench scale {domain}: CPU us per agent-step", header_style="bold")
    cols = [
        c
        for c in ("size", "agents", *COLUMNS, "env/raw", "env+comms", "total", "msg/s", "degree", "veh/light")
        if any(c in r for r in rows)
    ]
    for c in cols:
        table.add_column(c, justify="left" if c == "size" else "right")
    for r in rows:
        table.add_row(*[str(r[c]) if c in ("size", "agents") else (f"{r[c]:.3g}" if c in r else "-") for c in cols])
    table.add_row("slope", "", *[f"{fitted[c]:.2f}" if c in fitted else "" for c in cols[2:]])
    console.print(table)
    directory.mkdir(parents=True, exist_ok=True)
    files = write_table(rows, fitted, domain, directory) + plot(rows, domain, fitted, directory)
    verdict = "met" if fitted["env+comms"] <= 1.1 else "missed"
    console.print(
        f"log-log slope of a step's cost vs agents: env+comms {fitted['env+comms']:.2f} (target <= 1.1: {verdict}), "
        f"all columns {fitted['total']:.2f}; largest size {rows[-1]['size']} ({max(r['agents'] for r in rows)} agents); "
        f"{time.perf_counter() - wall:.0f} s wall"
    )
    console.print("wrote " + ", ".join(str(f) for f in files))
