"""Run episodes of a named scenario with a controller (or a saved policy) and record the KPIs.

This is the path behind ``marl run`` and every cell of ``marl compare``: build the scenario from
the registry, build the acting method, optionally put a protocol and a channel in the loop, run
``episodes`` episodes, and append one row per KPI per episode to the results directory.

Episode 0 of a run with seed ``s`` is reset with seed ``s`` itself; episode ``e > 0`` with a seed
derived from ``(s, e)`` by :func:`episode_seed`, so the episodes of seed 0 never repeat those of
seed 1 (seeds must be independent samples for the confidence intervals of ``marl report``). The
manifest lists every seed used, so a run is reproducible from it alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from marl.core import registry
from marl.core.config import build_config
from marl.core.controller import Controller
from marl.core.errors import ConfigError
from marl.core.seeding import episode_seed
from marl.results.records import (
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
    "run",
    "run_episode",
    "build_controller",
    "default_out_dir",
    "method_label",
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


def build_controller(
    scenario_id: str, name: str, env: Any, overrides: Mapping[str, Any] | None = None
) -> Controller:
    """Instantiate the named controller of the scenario's domain."""
    domain = registry.scenario_spec(scenario_id).domain
    spec = registry.controller_spec(domain, name)
    cls = registry.load(spec.entry_point)
    config = build_config(cls.Config, overrides, what="controller option")
    return cls(env, config)


def _build_comms(request: RunRequest, env: Any, payload_size: int) -> Any:
    """The protocol + channel pair for this run, or None for no communication at all."""
    if request.protocol == "none" and not request.channel:
        return None
    registry.protocol_spec(request.protocol)  # unknown names fail before any simulator starts
    from comms.runtime import build_comms

    return build_comms(
        protocol=request.protocol,
        channel=request.channel,
        agents=list(env.possible_agents),
        payload_size=payload_size,
        seed=request.seed,
    )


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
    channel = _canonical_channel(request.channel)
    env = registry.make_scenario(request.scenario, request.overrides, test=request.test)
    try:
        if request.policy is not None:
            from marl.train import policy_controller

            controller = policy_controller(
                request.policy, env, request.scenario, channel=request.channel or None
            )
            method = controller.method_name
        else:
            name = request.controller or spec.default_controller
            controller = build_controller(request.scenario, name, env, request.controller_overrides)
            method = method_label(name, request.controller_overrides)
        comms = _build_comms(request, env, controller.payload_size)

        run_id = new_run_id()
        seeds = [episode_seed(request.seed, e) for e in range(request.episodes)]
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
            kpis = run_episode(env, controller, comms, seed=seed, on_step=on_step)
            results.append(kpis)
            if writer is None:
                writer = RecordWriter(out_dir)
                writer.check_compatible(request.scenario, scenario_config)
            writer.append(
                Row(run_id, request.scenario, method, request.protocol, channel,
                    request.seed, episode, metric, float(value))
                for metric, value in kpis.items()
            )
            manifest["episodes_completed"] = episode + 1
            manifest["end_time"] = now_iso()
            writer.write_manifest(run_id, manifest)
            if on_episode is not None:
                on_episode(episode, kpis)
        return RunResult(run_id=run_id, out_dir=out_dir, method=method, episodes=results)
    finally:
        env.close()


def _canonical_channel(spec: str) -> str:
    """One spelling per channel setting (sorted keys, defaults dropped) so reports group right."""
    if not spec:
        return ""
    from comms.channel import parse_channel

    return parse_channel(spec).canonical()


def run_episode(
    env: Any,
    controller: Controller,
    comms: Any = None,
    *,
    seed: int,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """One episode; returns the scenario's KPIs plus ``return`` and, with comms, channel stats.

    ``return`` is the undiscounted episode reward summed over steps, averaged over agents.
    """
    observations, _ = env.reset(seed=seed)
    controller.reset(env, seed)
    if comms is not None:
        comms.reset(env.topology)
    reward_sum: dict[str, float] = {a: 0.0 for a in env.possible_agents}
    steps = 0
    while env.agents:
        messages = None
        if comms is not None:
            messages = comms.exchange(controller.payload(observations, env), env.topology)
        actions = controller.act(observations, env, messages)
        observations, rewards, _, _, _ = env.step(actions)
        for agent, reward in rewards.items():
            reward_sum[agent] += float(reward)
        steps += 1
        if on_step is not None:
            on_step(steps)
    kpis = {k: float(v) for k, v in env.episode_kpis().items()}
    kpis["return"] = float(np.mean(list(reward_sum.values()))) if reward_sum else 0.0
    kpis["env_steps"] = float(steps)
    if comms is not None:
        kpis.update({k: float(v) for k, v in comms.stats().items()})
    # Trained policies with learned protocols count their own bytes (a gate that stays silent
    # sends nothing); they report them here.
    episode_stats = getattr(controller, "episode_stats", None)
    if episode_stats is not None:
        kpis.update({k: float(v) for k, v in episode_stats().items()})
    return kpis
