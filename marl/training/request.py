"""What ``marl train`` is asked to do (:class:`TrainRequest`), checked once at the edge
(:func:`prepare` -> :class:`TrainPlan`), and what it returns (:class:`TrainResult`).

Every default of a training run lives on :class:`TrainRequest`; the CLI reads its defaults from
there (:func:`request_default`), so per-scenario presets can later be applied in one place.
:func:`prepare` validates names, values, the checkpoint to resume and the output directory before
any simulator starts and before anything is printed; the layers below trust the typed plan.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from marl.core import registry
from marl.core.config import build_config
from marl.core.errors import CheckpointError, ConfigError
from marl.results.records import check_out_dir

__all__ = [
    "TrainPlan",
    "TrainRequest",
    "TrainResult",
    "algorithm_class",
    "algorithm_config",
    "check_ranks",
    "method_name",
    "prepare",
    "request_default",
]


@dataclass
class TrainRequest:
    """Everything ``marl train`` needs; also what its manifest records."""

    scenario: str
    algo: str = "ippo"
    protocol: str = "none"
    channel: str = ""  #: channel spec, e.g. "drop=0.1,bits=8"; "" is a perfect channel
    steps: int = 20_000  #: total environment steps over all ranks
    seed: int = 0
    out: str | None = None  #: results directory; None: results/train-<scenario>-<algo>-<time>
    overrides: dict[str, str] = field(default_factory=dict)  #: scenario --set key=value
    algo_overrides: dict[str, str] = field(default_factory=dict)  #: --algo-set key=value
    eval_episodes: int = 3  #: final evaluation episodes (marl run's seeds: episode_seeds(seed, n))
    periodic_eval_episodes: int = 1  #: episodes per periodic evaluation (every eval_every updates)
    resume: str | None = None  #: checkpoint directory (or file) to continue from
    test: bool = False  #: apply the scenario's short test presets
    dist: Any = None  #: marl.distributed.DistConfig or None (one process)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"bad --steps {self.steps}; expected an integer >= 1")
        if self.seed < 0:
            raise ConfigError(f"bad --seed {self.seed}; expected an integer >= 0")
        if self.eval_episodes < 0 or self.periodic_eval_episodes < 0:
            raise ConfigError(f"bad --eval-episodes {self.eval_episodes}; expected an integer >= 0")


def request_default(name: str) -> Any:
    """The default of :class:`TrainRequest` field ``name`` (what the CLI shows and uses)."""
    for f in fields(TrainRequest):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
    raise KeyError(name)


@dataclass
class TrainPlan:
    """A validated request: the algorithm class, its typed config and everything resolved."""

    request: TrainRequest
    algo_cls: Any  #: registered algorithm class (Config, centralised_critic, update)
    config: Any  #: the algorithm's typed config: defaults < resumed checkpoint < --algo-set
    learned: bool  #: the protocol is a learned (torch) module
    channel_spec: Any  #: comms.channel.ChannelSpec parsed from request.channel, or None
    out_dir: Path
    resumed: dict[str, Any] | None  #: the loaded checkpoint to resume, or None

    @property
    def method(self) -> str:
        return method_name(self.request.algo, self.request.protocol)


@dataclass
class TrainResult:
    run_id: str
    out_dir: Path
    method: str  #: e.g. "ippo" or "ippo+tarmac"
    checkpoint: Path | None  #: newest checkpoint file
    updates: int
    env_steps: int  #: over all ranks
    seconds: float  #: wall time of the training loop (evaluation included)
    steps_per_second: float  #: env steps (this rank) per second of rollout + update time
    final_kpis: dict[str, float]  #: mean over the final evaluation episodes
    env_fraction: float = float("nan")  #: share of rollout + update time spent in env.reset/step
    train_returns: list[float] = field(default_factory=list)  #: per finished training episode
    events: list[dict[str, Any]] = field(default_factory=list)  #: distributed events (rank failures)


def algorithm_class(name: str) -> Any:
    """The registered algorithm class (``Config``, ``centralised_critic``, ``update``)."""
    return registry.load(registry.algorithm_spec(name).entry_point)


def algorithm_config(name: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """The algorithm's typed config: defaults < ``overrides`` (``--algo-set``)."""
    return build_config(algorithm_class(name).Config, overrides, what="--algo-set key")


def method_name(algo: str, protocol: str) -> str:
    return algo if protocol == "none" else f"{algo}+{protocol}"


def default_out_dir(request: TrainRequest) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("results") / f"train-{request.scenario.replace('/', '-')}-{request.algo}-{stamp}"


def check_ranks(config: Any, world_size: int) -> None:
    """Refuse settings that cannot work on several ranks (before launching, and again inside)."""
    if getattr(config, "target_kl", None) is not None and world_size > 1:
        # The early stop is decided on each rank's own KL: ranks would then run different
        # numbers of gradient syncs and deadlock in the allreduce.
        raise ConfigError(
            f"bad --algo-set target_kl={config.target_kl} with {world_size} ranks; "
            "allowed only with --ranks 1 (set target_kl=none)"
        )


def prepare(request: TrainRequest) -> TrainPlan:
    """Check every name and value of ``request`` and resolve it; raises a one-line ConcordError.

    Runs before any simulator, MPI launcher or progress output, so a bad ``--out``, a corrupt
    ``--resume`` checkpoint or an unknown key fails at once with exit code 2.
    """
    from marl.training.checkpoint import load_checkpoint

    algo_cls = algorithm_class(request.algo)
    registry.scenario_spec(request.scenario)
    proto_spec = registry.protocol_spec(request.protocol)
    if request.channel and request.protocol == "none":
        raise ConfigError(f"--channel '{request.channel}' needs a --protocol (allowed: "
                          + ", ".join(sorted(n for n in registry.protocols() if n != "none")) + ")")
    channel_spec = None
    if request.channel:
        from comms.channel import parse_channel

        channel_spec = parse_channel(request.channel)
    resumed = None
    layers: list[Mapping[str, Any] | None] = []
    if request.resume is not None:
        resumed = load_checkpoint(request.resume)
        meta = resumed["meta"]
        for key, mine in (("scenario", request.scenario), ("algo", request.algo),
                          ("protocol", request.protocol), ("channel", request.channel)):
            if meta[key] != mine:
                raise CheckpointError(
                    f"cannot resume: checkpoint {resumed['path']} has {key} '{meta[key]}', this run '{mine}'"
                )
        layers.append(meta["algo_config"])
    layers.append(request.algo_overrides)
    config = build_config(algo_cls.Config, *layers, what="--algo-set key")
    if proto_spec.learned and not hasattr(config, "comm_rounds"):
        raise ConfigError(f"algorithm {request.algo} cannot use learned protocol {request.protocol}")
    check_ranks(config, getattr(request.dist, "ranks", 1) if request.dist is not None else 1)
    registry.scenario_config(request.scenario, request.overrides, test=request.test)
    out_dir = Path(request.out) if request.out else default_out_dir(request)
    check_out_dir(out_dir)
    if resumed is None:
        from marl.training.log import check_out_is_free

        check_out_is_free(out_dir, request)
    return TrainPlan(request, algo_cls, config, proto_spec.learned, channel_spec, out_dir, resumed)
