"""What ``marl train`` is asked to do (:class:`TrainRequest`), checked once at the edge
(:func:`prepare` -> :class:`TrainPlan`), and what it returns (:class:`TrainResult`).

Every default of a training run lives on :class:`TrainRequest`; the CLI reads its defaults from
there (:func:`request_default`), so per-scenario presets can later be applied in one place.
:func:`prepare` validates names, values, the checkpoint to resume and the output directory before
any simulator starts and before anything is printed; the layers below trust the typed plan.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from marl.core import registry
from marl.core.config import build_config, check_local_processes
from marl.core.errors import CheckpointError, ConcordError, ConfigError
from marl.results.records import RECORDS_FILE, check_out_dir

__all__ = [
    "TrainPlan",
    "TrainRequest",
    "TrainResult",
    "algorithm_class",
    "algorithm_config",
    "check_ranks",
    "guide_class",
    "method_name",
    "prepare",
    "request_default",
    "with_preset",
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
    envs: int = 1  #: envs each rank rolls out at once (1 here, K - 1 in worker processes)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"bad --steps {self.steps}; expected an integer >= 1")
        if self.seed < 0:
            raise ConfigError(f"bad --seed {self.seed}; expected an integer >= 0")
        if self.envs < 1:
            raise ConfigError(f"bad --envs {self.envs}; expected an integer >= 1")
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


def with_preset(
    scenario: str,
    algo: str | None = None,
    protocol: str | None = None,
    steps: int | None = None,
    algo_overrides: Mapping[str, Any] | None = None,
) -> tuple[str, str, int, dict[str, Any], str]:
    """``(algo, protocol, steps, algo_overrides, note)`` for ``marl train scenario``: what the
    user gave (None: not given) over the scenario's :class:`~marl.core.registry.TrainingPreset`.

    The preset's ``algo_set`` applies only when the algorithm is the preset's (another
    algorithm's keys would not fit), key by key under the user's ``--algo-set``; its protocol
    only then too. ``note`` says what the preset supplied ("" when nothing came from it).
    """
    preset = registry.scenario_spec(scenario).training
    chosen = algo if algo is not None else preset.algo
    same = chosen == preset.algo
    used = []
    if algo is None:
        used.append(f"--algo {preset.algo}")
    if protocol is None and same and preset.protocol != "none":
        used.append(f"--protocol {preset.protocol}")
    if steps is None:
        used.append(f"--steps {preset.steps}")
    given = dict(algo_overrides or {})
    from_preset = {k: v for k, v in preset.algo_set.items() if same and k not in given}
    used += [f"--algo-set {k}={v}" for k, v in from_preset.items()]
    note = (
        f"{scenario} training preset: {' '.join(used)}" + (f" ({preset.note})" if preset.note else "") if used else ""
    )
    return (
        chosen,
        protocol if protocol is not None else (preset.protocol if same else "none"),
        steps if steps is not None else preset.steps,
        {**from_preset, **given},
        note,
    )


def preset_sets(scenario: str, algo: str, given: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The scenario ``--set`` values of a run: the preset's ``sets`` (when ``algo`` is the preset's)
    under the ones given, key by key; and the part of the note that says what came from the preset."""
    preset = registry.scenario_spec(scenario).training
    from_preset = {k: v for k, v in preset.sets.items() if algo == preset.algo and k not in given}
    return {**from_preset, **given}, "".join(f" --set {k}={v}" for k, v in from_preset.items())


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
    rollout_steps_per_second: float = 0.0  #: env steps (this rank, all envs) per second of rollout alone


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


def check_out_is_free(out_dir: Path, request: TrainRequest) -> None:
    """Refuse a fresh (not resumed) run into a directory that already holds rows of this
    scenario, algorithm, protocol, channel and seed: its curve and final evaluation would be
    recorded twice under one key."""
    path = out_dir / RECORDS_FILE
    if not path.exists():
        return
    key = [request.scenario, request.algo, request.protocol, request.channel, str(request.seed)]
    with path.open(newline="") as fh:
        taken = next(
            (
                r["run_id"]
                for r in csv.DictReader(fh)
                if [r["scenario"], r["method"], r["protocol"], r["channel"], r["seed"]] == key
            ),
            None,
        )
    if taken is not None:
        raise ConcordError(
            f"bad --out {out_dir}: it already holds {request.algo} seed {request.seed} on {request.scenario} "
            f"(run {taken}); allowed: --resume {out_dir} to continue it, or another --out"
        )


def guide_class(scenario: str, name: str, n_envs: int) -> Any:
    """The controller class ``--algo-set guide=NAME`` names, or None without a guide; one-line
    errors for a controller that does not apply, runs the net's own programme or talks."""
    if not name:
        return None
    spec = registry.scenario_controller(scenario, name)
    cls = registry.load(spec.entry_point)
    if spec.uses_messages or getattr(cls, "runs_program", False):
        raise ConfigError(
            f"bad guide={name}: it {'talks' if spec.uses_messages else 'runs the net programme'}; "
            "allowed: a controller that sets the agents' actions without messages"
        )
    if n_envs != 1:
        raise ConfigError(f"bad --envs {n_envs} with guide={name}; allowed: --envs 1 (the guide drives one env)")
    return cls


def _check_off_policy(request: TrainRequest, learned: bool, ranks: int) -> None:
    """What the off-policy loop (:mod:`marl.training.offpolicy`) does not do: learned protocols
    (their messages are trained through the PPO loss) and several MPI ranks."""
    if learned:
        raise ConfigError(
            f"bad --protocol {request.protocol} with --algo {request.algo}; allowed: none or a "
            "rule-based protocol (learned protocols need --algo ippo or mappo)"
        )
    if ranks > 1:
        raise ConfigError(
            f"bad --ranks {ranks} with --algo {request.algo}; allowed: 1 "
            "(off-policy training runs in one process; use ippo or mappo for several ranks)"
        )


def check_envs(request: TrainRequest, resumed: dict[str, Any] | None, ranks: int) -> None:
    """``--envs K`` starts K - 1 worker processes per rank: bound them as ranks are bounded; a
    resumed run keeps the checkpoint's K (its buffers, scaler state and saved episodes are per env)."""
    if request.envs > 1:
        oversubscribe = bool(getattr(request.dist, "oversubscribe", False))
        option = "--envs" if ranks == 1 else f"--ranks {ranks} x --envs {request.envs} ="
        # With a hostfile only the ranks mpiexec maps to this machine run their envs here.
        local = request.dist.local_ranks() if request.dist is not None and ranks > 1 else ranks
        check_local_processes(option, request.envs * max(local, 1), oversubscribe=oversubscribe)
    theirs = int(resumed.get("envs", 1)) if resumed is not None else request.envs
    if resumed is not None and theirs != request.envs:
        raise CheckpointError(
            f"cannot resume with --envs {request.envs} from {resumed['path']} (written with --envs {theirs}); "
            f"allowed: --envs {theirs}"
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
        raise ConfigError(
            f"--channel '{request.channel}' needs a --protocol (allowed: "
            + ", ".join(sorted(n for n in registry.protocols() if n != "none"))
            + ")"
        )
    from comms.channel import parse_channel

    def canonical(spec: str) -> str:  # one spelling per setting, as marl run records it
        return parse_channel(spec).canonical() if spec else ""

    channel_spec = parse_channel(request.channel) if request.channel else None
    request = replace(request, channel=channel_spec.canonical() if channel_spec is not None else "")
    resumed = None
    layers: list[Mapping[str, Any] | None] = []
    if request.resume is not None:
        resumed = load_checkpoint(request.resume)
        meta = resumed["meta"]
        for key, mine in (
            ("scenario", request.scenario),
            ("algo", request.algo),
            ("protocol", request.protocol),
            ("channel", request.channel),
        ):
            theirs = canonical(meta[key]) if key == "channel" else meta[key]
            if theirs != mine:
                raise CheckpointError(
                    f"cannot resume: checkpoint {resumed['path']} has {key} '{meta[key]}', this run '{mine}'"
                )
        layers.append(meta["algo_config"])
    layers.append(request.algo_overrides)
    config = build_config(algo_cls.Config, *layers, what="--algo-set key")
    ranks = getattr(request.dist, "ranks", 1) if request.dist is not None else 1
    if getattr(algo_cls, "off_policy", False):
        _check_off_policy(request, proto_spec.learned, ranks)
        guide_class(request.scenario, getattr(config, "guide", ""), request.envs)  # before any simulator starts
    if proto_spec.learned and not hasattr(config, "comm_rounds"):
        raise ConfigError(f"algorithm {request.algo} cannot use learned protocol {request.protocol}")
    check_ranks(config, ranks)
    check_envs(request, resumed, ranks)
    registry.scenario_config(request.scenario, request.overrides, test=request.test)
    out_dir = Path(request.out) if request.out else default_out_dir(request)
    check_out_dir(out_dir)
    if resumed is None and not getattr(request.dist, "respawned", False):  # a replacement joins the run there
        check_out_is_free(out_dir, request)
    return TrainPlan(request, algo_cls, config, proto_spec.learned, channel_spec, out_dir, resumed)
