"""Run episodes of a named scenario with a controller (or a saved policy) and record the KPIs.

This is the path behind ``marl run`` and every cell of ``marl compare``: build the scenario from
the registry, build the acting method, optionally put a protocol and a channel in the loop, run
``episodes`` episodes, and append one row per KPI per episode to the results directory.

Episode 0 of a run with seed ``s`` is reset with seed ``s`` itself; episode ``e > 0`` with a seed
derived from ``(s, e)`` by :func:`episode_seed`, so the episodes of seed 0 never repeat those of
seed 1 (seeds must be independent samples for the confidence intervals of ``marl report``). The
manifest lists every seed used, so a run is reproducible from it alone.

Running the same command again into the same ``--out`` resumes it: episodes already recorded by
an earlier run of the same request are not played again (their rows stay, written once), and a
directory whose rows for this scenario, method, protocol, channel and seed came from a different
request (another policy, another command) is refused, so no (seed, episode, metric) is ever
recorded twice. The episode loop itself is :func:`marl.episodes.run_episode`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from marl.core import registry
from marl.core.config import build_config
from marl.core.controller import Controller
from marl.core.errors import ConcordError, ConfigError
from marl.core.seeding import episode_seeds
from marl.episodes import run_episode
from marl.results.records import (
    MANIFEST_DIR,
    RECORDS_FILE,
    RecordWriter,
    Row,
    check_out_dir,
    environment_info,
    new_run_id,
    now_iso,
)

__all__ = [
    "RunRequest",
    "RunResult",
    "build_controller",
    "default_out_dir",
    "method_label",
    "policy_overrides",
    "run",
    "run_episode",  # re-exported from marl.episodes, where the loop lives
]


def method_label(name: str, overrides: Mapping[str, Any]) -> str:
    """``greedy`` or, with controller overrides, ``greedy[patience=0]``: rows of differently
    configured controllers must never be pooled by a report."""
    if not overrides:
        return name
    return name + "[" + ",".join(f"{k}={v}" for k, v in sorted(overrides.items())) + "]"


@dataclass
class RunRequest:
    """Everything ``marl run`` needs; also what its manifest records."""

    scenario: str
    controller: str | None = None  #: None: the scenario's default controller
    episodes: int = 1
    seed: int = 0
    out: str | None = None  #: results directory; None: results/<scenario>-<time>
    overrides: dict[str, str] = field(default_factory=dict)  #: --set key=value (scenario)
    controller_overrides: dict[str, str] = field(default_factory=dict)  #: --controller-set
    protocol: str = "none"
    channel: str = ""  #: channel spec, e.g. "drop=0.1,delay=1"; "" is a perfect channel
    policy: str | None = None  #: checkpoint directory or file of a trained policy
    test: bool = False  #: apply the scenario's short test presets

    def __post_init__(self) -> None:
        if self.episodes < 1:
            raise ConfigError(f"bad --episodes {self.episodes}; expected an integer >= 1")
        if self.seed < 0:
            raise ConfigError(f"bad --seed {self.seed}; expected an integer >= 0")
        if self.policy is not None and self.protocol != "none":
            raise ConfigError(
                f"bad --protocol {self.protocol} with --policy {self.policy}: the trained policy talks through "
                "the protocol it was trained with; allowed: --protocol none (the default)"
            )
        if self.policy is not None and (self.controller is not None or self.controller_overrides):
            given = f"--controller {self.controller}" if self.controller is not None else "--controller-set"
            raise ConfigError(
                f"bad {given} with --policy {self.policy}: the trained policy acts; "
                "allowed: either --policy or --controller"
            )
        from comms.channel import parse_channel
        from comms.runtime import validate_comms

        validate_comms(self.protocol, "")  # the name, and no learned protocol (marl train's)
        #: The parsed channel (None: perfect), checked once here; the runner reuses it.
        self.channel_spec: Any = parse_channel(self.channel) if self.channel else None


@dataclass
class RunResult:
    run_id: str
    out_dir: Path
    method: str
    episodes: list[dict[str, float]]  #: KPIs of each episode, in order

    def mean(self) -> dict[str, float]:
        keys = self.episodes[0].keys() if self.episodes else []
        return {k: float(np.mean([ep[k] for ep in self.episodes])) for k in keys}


def default_out_dir(scenario: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("results") / f"{scenario.replace('/', '-')}-{stamp}"


def policy_overrides(checkpoint: Mapping[str, Any], request: RunRequest) -> dict[str, Any]:
    """The scenario options a ``--policy`` run uses: those the policy was trained with (the loaded
    checkpoint's ``--set`` values, e.g. ``action=residual``: the observations and actions it
    learned on), under the run's own ``--set`` (e.g. ``split=eval``), which win key by key."""
    return {**(checkpoint["meta"].get("overrides") or {}), **request.overrides}


def build_controller(scenario_id: str, name: str, env: Any, overrides: Mapping[str, Any] | None = None) -> Controller:
    """Instantiate the named controller of the scenario (one that applies to it)."""
    spec = registry.scenario_controller(scenario_id, name)
    cls = registry.load(spec.entry_point)
    config = build_config(cls.Config, overrides, what="controller option")
    return cls(env, config)


def _build_comms(request: RunRequest, env: Any, payload_size: int) -> Any:
    """The protocol + channel pair for this run, or None for no communication at all."""
    if request.protocol == "none" and not request.channel:
        return None
    registry.protocol_spec(request.protocol)  # unknown names fail before any simulator starts
    from comms.channel import ChannelSpec
    from comms.runtime import build_comms

    spec = request.channel_spec or ChannelSpec()
    if not spec.seed_given:  # the run's seed drives the channel unless the spec names one
        spec = dataclasses.replace(spec, seed=int(request.seed))
    return build_comms(
        protocol=request.protocol,
        channel=spec,
        agents=list(env.possible_agents),
        payload_size=payload_size,
        seed=request.seed,
    )


def recorded_episodes(
    out_dir: Path, request: RunRequest, method: str, protocol: str, channel: str
) -> dict[int, dict[str, float]]:
    """KPIs of the episodes of this request already in ``out_dir`` (by episode number).

    Rows with this run's key (scenario, method, protocol, channel, seed) written by a run with a
    different request would be pooled with ours: ConcordError, choose another ``--out``.
    """
    path = out_dir / RECORDS_FILE
    if not path.exists():
        return {}
    key = [request.scenario, method, protocol, channel, str(request.seed)]
    with path.open(newline="") as fh:
        rows = [
            r for r in csv.DictReader(fh) if [r["scenario"], r["method"], r["protocol"], r["channel"], r["seed"]] == key
        ]
    mine = {k: v for k, v in asdict(request).items() if k not in ("episodes", "out")}
    episodes: dict[int, dict[str, float]] = {}
    for run_id in dict.fromkeys(r["run_id"] for r in rows):
        try:
            theirs = json.loads((out_dir / MANIFEST_DIR / f"{run_id}.json").read_text())
        except (OSError, ValueError):
            theirs = {}
        request_then = {k: v for k, v in (theirs.get("request") or {}).items() if k not in ("episodes", "out")}
        if theirs.get("command") != "run" or request_then != mine:
            raise ConcordError(
                f"bad --out {out_dir}: it already holds seed {request.seed} of {method} on {request.scenario} "
                f"from another request (run {run_id}, {theirs.get('command', 'unknown')}); "
                "allowed: the same command again (resumes) or another --out"
            )
        for r in rows:
            if r["run_id"] == run_id:
                episodes.setdefault(int(r["episode"]), {})[r["metric"]] = float(r["value"])
    return episodes


def run(
    request: RunRequest,
    *,
    on_step: Callable[[int], None] | None = None,
    on_episode: Callable[[int, dict[str, float]], None] | None = None,
) -> RunResult:
    """Run ``request``; ``on_step(steps_done)`` and ``on_episode(i, kpis)`` drive progress bars."""
    spec = registry.scenario_spec(request.scenario)
    out_dir = Path(request.out) if request.out else default_out_dir(request.scenario)
    check_out_dir(out_dir)
    channel = request.channel_spec.canonical() if request.channel_spec is not None else ""
    checkpoint = None
    if request.policy is not None:
        from marl.training import load_checkpoint, policy_controller

        checkpoint = load_checkpoint(request.policy)  # once: its options build the env, its weights act
    overrides = policy_overrides(checkpoint, request) if checkpoint is not None else request.overrides
    env = registry.make_scenario(request.scenario, overrides, test=request.test)
    try:
        if checkpoint is not None:
            controller = policy_controller(checkpoint, env, request.scenario, channel=request.channel_spec)
            # Rows as training's evaluation writes them: method = algorithm, protocol = the one it
            # was trained with (a learned one such as tarmac included), so the two are comparable.
            method, protocol = checkpoint["meta"]["algo"], checkpoint["meta"]["protocol"]
        else:
            name = request.controller or spec.default_controller
            controller = build_controller(request.scenario, name, env, request.controller_overrides)
            method, protocol = method_label(name, request.controller_overrides), request.protocol
        comms = _build_comms(request, env, controller.payload_size)

        run_id = new_run_id()
        seeds = episode_seeds(request.seed, request.episodes)
        done = recorded_episodes(out_dir, request, method, protocol, channel)
        scenario_config = asdict(env.config) if hasattr(env, "config") else None
        manifest: dict[str, Any] = {
            "run_id": run_id,
            "command": "run",
            "request": asdict(request),
            "method": method,
            "scenario": request.scenario,
            "scenario_config": scenario_config,
            "seeds": seeds,
            "start_time": now_iso(),
            "end_time": None,
            "episodes_completed": 0,
            **environment_info(),
        }
        # The directory and manifest are written only once the first episode has finished, so a
        # run that fails at start (a bad net file, say) leaves nothing behind.
        writer: RecordWriter | None = None
        results: list[dict[str, float]] = []
        for episode, seed in enumerate(seeds):
            if episode in done:  # recorded by an earlier run of this command: not again
                results.append(done[episode])
                if on_episode is not None:
                    on_episode(episode, done[episode])
                continue
            kpis = run_episode(env, controller, comms, seed=seed, on_step=on_step)
            results.append(kpis)
            if writer is None:
                writer = RecordWriter(out_dir)
                writer.check_compatible(request.scenario, scenario_config)
            writer.append(
                Row(
                    run_id,
                    request.scenario,
                    method,
                    protocol,
                    channel,
                    request.seed,
                    episode,
                    metric,
                    float(value),
                )
                for metric, value in kpis.items()
            )
            manifest["episodes_completed"] = episode + 1
            manifest["episodes_resumed"] = sorted(e for e in done if e < request.episodes)
            manifest["end_time"] = now_iso()
            writer.write_manifest(run_id, manifest)
            if on_episode is not None:
                on_episode(episode, kpis)
        return RunResult(run_id=run_id, out_dir=out_dir, method=method, episodes=results)
    finally:
        env.close()
