"""The training loop: rollouts -> loss -> gradient sync -> optimiser step -> log -> checkpoint.

``marl train`` and ``marl compare`` call :func:`train` with a :class:`TrainRequest`. One process
runs one scenario instance (libsumo allows one simulation per process); with ``--ranks N`` each
MPI rank runs its own instance with its own seed and gradients are averaged across ranks through
:mod:`marl.distributed` (contract: notes/TRAIN_DIST_CONTRACT.md). The algorithm's loss and update
live in ``marl/algos/<name>.py``; the networks in :mod:`marl.policies`.

Per update (``num_steps`` environment steps on each rank)::

    obs ──▶ actor (encoder ─▶ comms(h, channel mask) ─▶ head) ──▶ actions ──▶ env.step
    ... num_steps ... ──▶ GAE ──▶ PPO epochs (backward ─▶ sync_grads ─▶ clip ─▶ Adam step)
    ──▶ records rows (train_return, train_<kpi>, losses) ──▶ evaluation / checkpoint when due

Communication during training is exactly what evaluation sees: a *learned* protocol (CommNet,
TarMAC, IC3Net) receives, every step, the delivery mask drawn by a :class:`comms.channel.Channel`
built from ``--channel`` (loss, crashes, budget), and its messages go through the channel's
quantiser (straight-through). The mask is drawn for this step's links: the channel's ``delay``
does not apply to learned protocols (:meth:`comms.channel.Channel.delivery_mask`). A
*rule-based* protocol (neighbours, broadcast, gossip, consensus) carries each agent's observation
over the channel and the protocol's summary of what arrived is appended to the receiver's
observation.

Counting: ``--steps`` is the total number of environment steps over all ranks (one step = every
agent acts once). Training episode ``k`` on rank ``r`` is reset with a seed drawn from
``SeedSequence([seed + 1000 r, k])``; evaluation episode ``e`` uses seed ``seed + e``, exactly as
``marl run --seed`` does, so trained policies and baselines are scored on the same episodes.

Checkpoints (``<out>/checkpoints/update-<N>.pt`` + ``latest.json``) hold plain state dicts,
tensors, numbers and a JSON string of metadata only, and are loaded with
``torch.load(weights_only=True)``. Resuming restores parameters, optimiser state, reward/value
normalisers, the torch RNG and the update/step/episode counters; the episode that was running when
the checkpoint was written is not restored — training resumes with a fresh episode.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from marl.core import registry
from marl.core.config import build_config, to_dict
from marl.core.controller import Controller
from marl.core.protocol import make_quantiser
from marl.core.errors import CheckpointError, ConcordError, ConfigError
from marl.results.io import atomic_write, atomic_write_json
from marl.results.records import Row, RecordWriter, environment_info, new_run_id, now_iso

__all__ = [
    "TrainRequest",
    "TrainResult",
    "train",
    "policy_controller",
    "PolicyController",
    "algorithm_class",
    "algorithm_config",
    "load_checkpoint",
    "resolve_checkpoint",
    "CHECKPOINT_DIR",
]

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest.json"
CHECKPOINT_FORMAT = 1


# --------------------------------------------------------------------------------------------
# Requests and results


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
    eval_episodes: int = 3  #: final evaluation episodes (seeds seed .. seed+eval_episodes-1)
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


def _torch() -> Any:
    import torch

    return torch


# --------------------------------------------------------------------------------------------
# The team: dicts of the PettingZoo API <-> padded [N, ...] arrays


@dataclass
class TeamLayout:
    """How the scenario's per-agent spaces map onto one padded team tensor.

    Observations are flattened and zero-padded to the largest size; discrete action spaces of
    different sizes become one ``Discrete(max)`` whose extra choices are masked out; continuous
    actions must share one Box shape.
    """

    agents: list[str]
    obs_sizes: list[int]
    kind: str  #: "discrete" | "continuous"
    action_sizes: list[int]
    low: list[float] = field(default_factory=list)
    high: list[float] = field(default_factory=list)
    state_size: int = 0

    @property
    def n(self) -> int:
        return len(self.agents)

    @property
    def obs_dim(self) -> int:
        return max(self.obs_sizes)

    @property
    def action_dim(self) -> int:
        return max(self.action_sizes)

    @classmethod
    def of(cls, env: Any, scenario_id: str, need_state: bool) -> TeamLayout:
        from gymnasium import spaces

        agents = list(env.possible_agents)
        obs_sizes, action_sizes, kinds = [], [], set()
        low: list[float] = []
        high: list[float] = []
        for agent in agents:
            ospace = env.observation_space(agent)
            if not isinstance(ospace, spaces.Box):
                raise ConfigError(
                    f"scenario {scenario_id}: observation space {type(ospace).__name__} of {agent} "
                    "is not supported; allowed: Box"
                )
            obs_sizes.append(int(np.prod(ospace.shape)))
            aspace = env.action_space(agent)
            if isinstance(aspace, spaces.Discrete):
                kinds.add("discrete")
                action_sizes.append(int(aspace.n))
            elif isinstance(aspace, spaces.Box) and len(aspace.shape) == 1:
                kinds.add("continuous")
                action_sizes.append(int(aspace.shape[0]))
                low, high = aspace.low.astype(float).tolist(), aspace.high.astype(float).tolist()
            else:
                raise ConfigError(
                    f"scenario {scenario_id}: action space {aspace} of {agent} is not supported; "
                    "allowed: Discrete, 1-D Box"
                )
        if len(kinds) != 1:
            raise ConfigError(f"scenario {scenario_id} mixes discrete and continuous actions; not supported")
        kind = kinds.pop()
        if kind == "continuous" and len(set(action_sizes)) != 1:
            raise ConfigError(f"scenario {scenario_id}: agents' Box actions differ in size; not supported")
        state_size = 0
        if need_state:
            try:
                state_size = int(np.asarray(env.state()).size)
            except NotImplementedError:
                raise ConfigError(
                    f"scenario {scenario_id} has no global state(); use --algo ippo"
                ) from None
        return cls(agents, obs_sizes, kind, action_sizes, low, high, state_size)

    def obs_array(self, observations: Mapping[str, Any]) -> np.ndarray:
        out = np.zeros((self.n, self.obs_dim), dtype=np.float32)
        for i, agent in enumerate(self.agents):
            row = np.asarray(observations[agent], dtype=np.float32).ravel()
            out[i, : row.size] = row
        return out

    def action_masks(self, infos: Mapping[str, Any] | None, env: Any) -> np.ndarray | None:
        """[N, A] bool for discrete actions (padding choices and ``action_mask`` entries False)."""
        if self.kind != "discrete":
            return None
        mask = np.zeros((self.n, self.action_dim), dtype=bool)
        for i, (agent, size) in enumerate(zip(self.agents, self.action_sizes)):
            mask[i, :size] = True
            given = None
            if infos is not None and agent in infos and "action_mask" in infos[agent]:
                given = infos[agent]["action_mask"]
            elif infos is None and hasattr(env, "action_mask"):
                given = env.action_mask(agent)
            if given is not None:
                given = np.asarray(given, dtype=bool).ravel()
                mask[i, : given.size] &= given
                mask[i, given.size :] = False
        return mask

    def actions_dict(self, actions: np.ndarray) -> dict[str, Any]:
        if self.kind == "discrete":
            return {a: int(actions[i]) for i, a in enumerate(self.agents)}
        return {a: actions[i].astype(np.float32) for i, a in enumerate(self.agents)}

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)


def _check_team(env: Any, layout: TeamLayout, scenario_id: str) -> None:
    """IPPO/MAPPO batch a fixed team: agents that join or leave mid-episode are rejected."""
    if env.agents and list(env.agents) != layout.agents:
        missing = sorted(set(layout.agents) - set(env.agents))
        extra = sorted(set(env.agents) - set(layout.agents))
        raise ConcordError(
            f"scenario {scenario_id} changed its team mid-episode (left: {missing or '-'}, joined: "
            f"{extra or '-'}); ippo/mappo need every agent to act every step until the episode ends"
        )


# --------------------------------------------------------------------------------------------
# Communication as the policy sees it


class Communication:
    """The protocol/channel pair of a policy.

    * ``none``: no messages;
    * rule-based (``neighbours``, ...): each agent sends its observation through
      :func:`comms.runtime.build_comms`; the protocol's output is appended to the observation;
    * learned (``commnet``, ``tarmac``, ``ic3net``): a :class:`comms.channel.Channel` draws the
      per-step delivery mask the torch module reads; quantisation bits come from the channel spec.
    """

    def __init__(self, protocol: str, channel: str, agents: list[str], obs_dim: int, seed: int,
                 mode: str = "neighbours", hidden_size: int = 64) -> None:
        self.protocol, self.channel_spec, self.mode = protocol, channel, mode
        spec = registry.protocol_spec(protocol)
        self.learned = spec.learned
        self.runtime: Any = None
        self.channel: Any = None
        self.message_size = 0  #: extra observation values (rule-based protocols)
        self.payload_size = 0  #: learned payload length used for the channel's byte model
        self.episode = 0
        self.seed = seed
        if self.learned:
            from comms.channel import Channel, ChannelSpec, parse_channel

            cs = parse_channel(channel)
            if "seed=" not in channel.replace(" ", ""):
                cs = ChannelSpec(**{**cs.__dict__, "seed": int(seed)})
            self.channel = Channel(list(agents), cs)
            self.payload_size = hidden_size
        elif protocol != "none" or channel:
            from comms.runtime import build_comms

            self.runtime = build_comms(protocol=protocol, channel=channel, agents=list(agents),
                                       payload_size=obs_dim, seed=seed)
            self.message_size = int(self.runtime.output_size)
        self.bytes_module = 0.0  # learned: bytes the module reported this episode
        self.steps = 0

    @property
    def bits(self) -> int:
        return int(self.channel.spec.bits) if self.channel is not None else 32

    def reset(self, env: Any, seed: int) -> None:
        self.steps, self.bytes_module = 0, 0.0
        if self.channel is not None:
            self.channel.reset(seed=[self.channel.spec.seed, seed])
            self.channel.set_topology(env.topology)
        if self.runtime is not None:
            self.runtime.reset(env.topology)

    def delivered(self, env: Any) -> np.ndarray | None:
        """This step's [N, N] mask (receiver, sender) for a learned protocol, else None."""
        if self.channel is None:
            return None
        self.channel.set_topology(env.topology)
        self.steps += 1
        return self.channel.delivery_mask(self.payload_size, mode=self.mode)

    def count_bytes(self, bytes_sent: Any) -> None:
        """Add a learned module's bytes for this step; a crashed agent, or one without any
        link in neighbours mode, puts nothing on the channel."""
        sends = self.channel.alive.copy()
        if self.mode == "neighbours":
            sends &= self.channel.degree() > 0
        self.bytes_module += float((bytes_sent.reshape(-1).numpy() * sends).sum())

    def augment(self, obs: np.ndarray, env: Any) -> np.ndarray:
        """Append what a rule-based protocol delivered to each agent's observation."""
        if self.runtime is None:
            return obs
        payloads = {a: obs[i] for i, a in enumerate(self.runtime.agents)}
        msgs = self.runtime.exchange(payloads, env.topology)
        self.steps += 1
        extra = np.stack([msgs[a] for a in self.runtime.agents]).astype(np.float32)
        return np.concatenate([obs, extra], axis=1)

    def stats(self) -> dict[str, float]:
        if self.runtime is not None:
            return {k: float(v) for k, v in self.runtime.stats().items()}
        if self.channel is not None:
            totals = {k: float(v) for k, v in self.channel.totals().items()}
            # The learned module's own count (an IC3Net agent that stays silent sends nothing);
            # the channel's totals count every link the mask was drawn for.
            totals["channel_bytes_per_agent_step"] = totals.pop("bytes_per_agent_step")
            totals["bytes_per_agent_step"] = self.bytes_module / (self.channel.n * max(self.steps, 1))
            return totals
        return {}


# --------------------------------------------------------------------------------------------
# Building the model


def build_model(algo_cls: Any, config: Any, layout: TeamLayout, comm: Communication) -> Any:
    """The ActorCritic for this team, with the learned protocol plugged between encoder and head."""
    from marl.policies import ActionSpec, ActorCritic

    comms_module = None
    if comm.learned:
        cls = registry.load(registry.protocol_spec(comm.protocol).entry_point)
        bits = comm.bits
        comms_module = cls(
            hidden_size=config.hidden_size,
            rounds=config.comm_rounds,
            quantise=make_quantiser(bits),
            bytes_per_value=bits / 8.0,
        )
        # Channel byte model per message = header + scale + payload (comms.channel.message_bytes).
        comm.payload_size = int(getattr(comms_module, "key_size", 0) + getattr(comms_module, "value_size", 0)) \
            or config.hidden_size
    action = ActionSpec(
        kind=layout.kind,
        size=layout.action_dim,
        low=tuple(layout.low),
        high=tuple(layout.high),
    )
    critic_dim = layout.state_size if algo_cls.centralised_critic else layout.obs_dim + comm.message_size
    return ActorCritic(
        n_agents=layout.n,
        obs_dim=layout.obs_dim + comm.message_size,
        critic_dim=critic_dim,
        action=action,
        hidden=config.hidden_size,
        shared=config.shared_parameters,
        agent_id=config.agent_id,
        comms=comms_module,
    )


# --------------------------------------------------------------------------------------------
# Acting (shared by training rollouts, evaluation and `marl run --policy`)


def _act(model: Any, obs: np.ndarray, delivered: np.ndarray | None, amask: np.ndarray | None,
         deterministic: bool, critic_in: np.ndarray | None = None) -> tuple[Any, Any, Any, Any]:
    """One batched forward for the whole team: (action [N..], logprob [N], comms output, value [N]).

    The value (critic) is computed in the same no-grad pass when ``critic_in`` is given.
    """
    torch = _torch()
    from torch.distributions import Categorical

    from marl.policies import log_prob_entropy

    with torch.inference_mode():
        dist, cout = model.actor(
            torch.from_numpy(obs)[None],
            None if delivered is None else torch.from_numpy(delivered)[None],
            None if amask is None else torch.from_numpy(amask)[None],
            deterministic_gate=deterministic,
        )
        if isinstance(dist, Categorical):
            # Straight from the logits: cheaper than Categorical.sample/log_prob per step.
            logp_all = dist.logits  # normalised log-probabilities
            action = logp_all.argmax(-1) if deterministic else torch.multinomial(
                logp_all.reshape(-1, logp_all.shape[-1]).exp(), 1).reshape(logp_all.shape[:-1])
            logprob = logp_all.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        else:
            action = dist.mean if deterministic else dist.sample()
            logprob, _ = log_prob_entropy(dist, action)
        if cout is not None and cout.logprob is not None:
            logprob = logprob + cout.logprob
        value = None if critic_in is None else model.value(torch.from_numpy(critic_in)[None])[0]
    return action[0], logprob[0], cout, value


class PolicyController(Controller):
    """A trained policy behind the controller interface (``marl run --policy``, evaluation)."""

    payload_size = 0  # talks through its own channel, not the runner's

    def __init__(self, model: Any, layout: TeamLayout, comm: Communication, method: str,
                 deterministic: bool = True) -> None:
        super().__init__(None)
        self.model, self.layout, self.comm = model, layout, comm
        self.method_name = method
        self.deterministic = deterministic

    def reset(self, env: Any, seed: int | None = None) -> None:
        self.comm.reset(env, 0 if seed is None else int(seed))

    def act(self, observations: dict[str, np.ndarray], env: Any,
            messages: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        obs = self.comm.augment(self.layout.obs_array(observations), env)
        delivered = self.comm.delivered(env)
        amask = self.layout.action_masks(getattr(env, "infos", None) if hasattr(env, "infos") else None, env)
        action, _, cout, _ = _act(self.model, obs, delivered, amask, self.deterministic)
        if cout is not None:
            self.comm.count_bytes(cout.bytes_sent)
        action = self.model.clip_action(action)
        return self.layout.actions_dict(action.numpy())

    def episode_stats(self) -> dict[str, float]:
        """Channel totals of the episode (bytes per agent step etc.), for records."""
        return self.comm.stats()


# --------------------------------------------------------------------------------------------
# Checkpoints


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file from a file path, a checkpoints directory or a training output directory."""
    p = Path(path)
    if p.is_file():
        return p
    for directory in (p, p / CHECKPOINT_DIR):
        latest = directory / LATEST_FILE
        if latest.is_file():
            try:
                name = json.loads(latest.read_text())["file"]
            except (OSError, ValueError, KeyError, TypeError):
                raise CheckpointError(f"corrupt checkpoint index {latest}; expected JSON with 'file'") from None
            target = directory / name
            if not target.is_file():
                raise CheckpointError(f"checkpoint {target} named by {latest} is missing")
            return target
    raise CheckpointError(
        f"no checkpoint at '{path}'; expected a .pt file, a checkpoints directory with {LATEST_FILE}, "
        "or a 'marl train' output directory"
    )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; its ``meta`` JSON is decoded."""
    torch = _torch()
    file = resolve_checkpoint(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        meta = json.loads(state["meta"])
    except Exception as exc:  # torch raises many types for a torn or foreign file
        raise CheckpointError(f"corrupt checkpoint {file}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {file} has format {meta.get('format')!r}; expected {CHECKPOINT_FORMAT}")
    state["meta"] = meta
    state["path"] = str(file)
    return state


def save_checkpoint(directory: Path, update: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``update-<N>.pt`` atomically, point ``latest.json`` at it, keep the newest ``keep``."""
    torch = _torch()
    directory.mkdir(parents=True, exist_ok=True)
    name = f"update-{update:06d}.pt"
    target = atomic_write(directory / name, lambda fh: torch.save(state, fh))
    atomic_write_json(directory / LATEST_FILE, {
        "file": name, "update": update, "env_steps": int(state["env_steps"]), "time": now_iso(),
    })
    for old in sorted(directory.glob("update-*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
    return target


def _meta(request: TrainRequest, config: Any, layout: TeamLayout) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "scenario": request.scenario,
        "overrides": dict(request.overrides),
        "test": request.test,
        "algo": request.algo,
        "protocol": request.protocol,
        "channel": request.channel,
        "algo_config": to_dict(config),
        "layout": layout.to_meta(),
    }


def _policy_from_checkpoint(state: Mapping[str, Any], env: Any, scenario_id: str, seed: int = 0,
                            channel: str | None = None) -> PolicyController:
    meta = state["meta"]
    algo_cls = algorithm_class(meta["algo"])
    config = build_config(algo_cls.Config, meta["algo_config"], what="checkpoint algo_config")
    layout = TeamLayout.of(env, scenario_id, need_state=False)  # acting needs no global state
    saved = TeamLayout(**meta["layout"])
    if (layout.agents, layout.obs_sizes, layout.action_sizes, layout.kind) != (
        saved.agents, saved.obs_sizes, saved.action_sizes, saved.kind
    ):
        raise CheckpointError(
            f"checkpoint {state['path']} was trained on {meta['scenario']} ({saved.n} agents, obs "
            f"{saved.obs_dim}, actions {saved.action_dim}); {scenario_id} has {layout.n} agents, obs "
            f"{layout.obs_dim}, actions {layout.action_dim}"
        )
    layout = saved
    channel = meta["channel"] if channel is None else channel
    comm = Communication(meta["protocol"], channel, layout.agents, layout.obs_dim, seed,
                         mode=config.comm_mode, hidden_size=config.hidden_size)
    model = build_model(algo_cls, config, layout, comm)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {state['path']} does not fit the model: {str(exc).splitlines()[0]}") from None
    model.eval()
    return PolicyController(model, layout, comm, method_name(meta["algo"], meta["protocol"]),
                            deterministic=config.deterministic_eval)


def policy_controller(path: str | Path, env: Any, scenario_id: str, channel: str | None = None) -> PolicyController:
    """The trained policy saved at ``path`` as a controller for ``env`` (``marl run --policy``).

    It evaluates under ``channel`` (a spec string), by default the channel it was trained with
    (stored in the checkpoint), with the most likely action unless the config said otherwise.
    """
    _torch().set_num_threads(1)
    return _policy_from_checkpoint(load_checkpoint(path), env, scenario_id, channel=channel)


# --------------------------------------------------------------------------------------------
# Distributed world (contract: notes/TRAIN_DIST_CONTRACT.md)


class _SingleProcessWorld:
    """FALLBACK ONLY, used while ``marl.distributed`` is absent: world size 1, no MPI.

    The MPI engineer's ``marl.distributed.init_world`` replaces this entirely; it exists so the
    training loop runs before that package lands. Ranks > 1 without it fail clearly.
    """

    rank, size, is_root = 0, 1, True

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def broadcast_state(self, model: Any, optimizer: Any) -> None:
        pass

    def check_identical(self, model: Any) -> None:
        pass

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return metrics

    def agree(self, update: int) -> int:
        return update

    def maybe_inject_failure(self, update: int) -> None:
        pass

    def recover(self, model: Any, optimizer: Any) -> None:  # pragma: no cover - never raised here
        raise RuntimeError("no peers to recover from")

    def close(self) -> None:
        pass


def _init_distributed(dist_cfg: Any, topology: Any) -> tuple[Any, Callable[[list[Any]], int] | None, type]:
    """(world, sync_grads, RankFailure) — the MPI engineer's implementation when present."""
    ranks = getattr(dist_cfg, "ranks", 1) if dist_cfg is not None else 1
    try:
        import marl.distributed as dist
    except ModuleNotFoundError as exc:
        if exc.name != "marl.distributed":
            raise
        dist = None
    if dist is None or not hasattr(dist, "init_world"):
        if ranks > 1:
            raise ConcordError(f"--ranks {ranks} needs marl.distributed, which is not installed in this build")
        return _SingleProcessWorld(), None, _NeverRaised
    cfg = dist_cfg if dist_cfg is not None else dist.DistConfig()
    world = dist.init_world(cfg)
    # prescaled: ppo_update multiplies the loss by sync.grad_scale, so the allreduce needs no
    # averaging pass (the sync object is callable as sync_grads(params)).
    sync = dist.make_sync(world, cfg, topology, prescaled=True)
    return world, sync, dist.RankFailure


class _NeverRaised(Exception):
    """Stand-in for RankFailure when there is no MPI."""


# --------------------------------------------------------------------------------------------
# The loop


def _episode_seed(seed: int, rank: int, episode: int) -> int:
    return int(np.random.SeedSequence([seed + 1000 * rank, episode]).generate_state(1)[0] % (2**31 - 1))


def default_out_dir(request: TrainRequest) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("results") / f"train-{request.scenario.replace('/', '-')}-{request.algo}-{stamp}"


def evaluate(env: Any, controller: PolicyController, seeds: list[int]) -> list[dict[str, float]]:
    """Run one deterministic episode per seed through the ``marl run`` episode loop."""
    from marl.runner import run_episode

    controller.model.eval()
    results = []
    for s in seeds:
        kpis = run_episode(env, controller, None, seed=s)
        kpis.update(controller.episode_stats())
        results.append(kpis)
    controller.model.train()
    return results


def check_ranks(config: Any, world_size: int) -> None:
    """Refuse settings that cannot work on several ranks (before launching, and again inside)."""
    if getattr(config, "target_kl", None) is not None and world_size > 1:
        # The early stop is decided on each rank's own KL: ranks would then run different
        # numbers of gradient syncs and deadlock in the allreduce.
        raise ConfigError(
            f"bad --algo-set target_kl={config.target_kl} with {world_size} ranks; "
            "allowed only with --ranks 1 (set target_kl=none)"
        )


def train(request: TrainRequest, on_progress: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``request.algo`` on ``request.scenario``; write records, checkpoints and a manifest.

    ``on_progress(info)`` is called after every update (and after evaluations) with ``env_steps``,
    ``total_steps``, ``update``, ``steps_per_second``, ``episode_return``, ``kpi`` (name),
    ``kpi_value`` and ``phase`` ("train" | "eval").
    """
    torch = _torch()
    from marl.algos.ippo import Batch, RewardScaler, RunningMeanStd, compute_gae

    # ---- validate names before any simulator starts
    algo_cls = algorithm_class(request.algo)
    registry.scenario_spec(request.scenario)
    proto_spec = registry.protocol_spec(request.protocol)
    resumed: dict[str, Any] | None = None
    algo_layers: list[Mapping[str, Any] | None] = []
    if request.resume is not None:
        resumed = load_checkpoint(request.resume)
        meta = resumed["meta"]
        for key, mine in (("scenario", request.scenario), ("algo", request.algo),
                          ("protocol", request.protocol), ("channel", request.channel)):
            if meta[key] != mine:
                raise CheckpointError(
                    f"cannot resume: checkpoint {resumed['path']} has {key} '{meta[key]}', this run '{mine}'"
                )
        algo_layers.append(meta["algo_config"])
    algo_layers.append(request.algo_overrides)
    config = build_config(algo_cls.Config, *algo_layers, what="--algo-set key")
    registry.scenario_config(request.scenario, request.overrides, test=request.test)
    if proto_spec.learned and not hasattr(config, "comm_rounds"):
        raise ConfigError(f"algorithm {request.algo} cannot use learned protocol {request.protocol}")
    torch.set_num_threads(config.torch_threads)

    env = registry.make_scenario(request.scenario, request.overrides, test=request.test)
    world = None
    try:
        # Some scenarios know their state size and topology only after a reset; the first
        # training episode resets again with its own seed.
        env.reset(seed=request.seed)
        layout = TeamLayout.of(env, request.scenario, need_state=algo_cls.centralised_critic)
        world, sync_grads, rank_failure = _init_distributed(request.dist, env.topology)
        rank = world.rank
        check_ranks(config, world.size)
        torch.manual_seed(request.seed)  # identical initial weights on every rank (contract)
        comm = Communication(request.protocol, request.channel, layout.agents, layout.obs_dim,
                             request.seed + 1000 * rank, mode=config.comm_mode, hidden_size=config.hidden_size)
        model = build_model(algo_cls, config, layout, comm)
        # Adam eps 1e-5 (Huang et al. 2022, detail 3).
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, eps=1e-5, foreach=True)
        scaler = RewardScaler(layout.n, config.gamma) if config.norm_reward else None
        value_rms = RunningMeanStd() if config.norm_value else None
        update0, env_steps, episodes = 0, 0, 0
        if resumed is not None:
            try:
                model.load_state_dict(resumed["model"])
                optimizer.load_state_dict(resumed["optimizer"])
            except (RuntimeError, ValueError, KeyError) as exc:
                raise CheckpointError(f"checkpoint {resumed['path']} does not fit: {str(exc).splitlines()[0]}") from None
            update0, env_steps = int(resumed["update"]), int(resumed["env_steps"])
            episodes = int(resumed["episodes"])
            if scaler is not None and "reward_scaler" in resumed:
                scaler.load_state_dict(resumed["reward_scaler"])
            if value_rms is not None and "value_norm" in resumed:
                value_rms.load_state_dict(resumed["value_norm"])
            if rank == 0 and "torch_rng" in resumed:
                torch.set_rng_state(resumed["torch_rng"])
        world.broadcast_state(model, optimizer)
        world.check_identical(model)
        if rank > 0:
            torch.manual_seed(request.seed + 7919 * rank)  # different action sampling per rank

        per_update = config.num_steps * world.size
        # Training runs until ``steps`` env steps over all ranks are done; counting steps rather
        # than updates keeps the schedule right when a run is resumed with another world size.
        method = method_name(request.algo, request.protocol)
        out_dir = Path(request.out) if request.out else default_out_dir(request)
        run_id = new_run_id()
        writer = RecordWriter(out_dir) if world.is_root else None
        ckpt_dir = out_dir / CHECKPOINT_DIR
        main_kpi = getattr(env, "main_kpi", "") or ""
        manifest: dict[str, Any] = {
            "run_id": run_id,
            "command": "train",
            "request": {**asdict(request), "dist": asdict(request.dist) if request.dist is not None else None},
            "method": method,
            "algo_config": to_dict(config),
            "scenario_config": asdict(env.config) if hasattr(env, "config") else None,
            "layout": layout.to_meta(),
            "resumed_from": None if resumed is None else resumed["path"],
            "start_time": now_iso(),
            "end_time": None,
            "updates_completed": update0,
            "env_steps": env_steps,
            "events": [],
            **environment_info(world.size),
        }
        if writer is not None:
            writer.write_manifest(run_id, manifest)

        def row(episode: int, metric: str, value: float) -> Row:
            # method = the algorithm, protocol column = the protocol (as marl run's records).
            return Row(run_id, request.scenario, request.algo, request.protocol, request.channel,
                       request.seed, episode, metric, float(value))

        def progress(**info: Any) -> None:
            if on_progress is not None and world.is_root:
                on_progress({"total_steps": request.steps, "kpi": main_kpi, **info})

        policy = PolicyController(model, layout, comm, method, deterministic=config.deterministic_eval)

        def run_eval(update: int, n: int) -> list[dict[str, float]]:
            # Periodic evaluation uses seeds far from the final ones (which equal marl run's).
            return evaluate(env, policy, [request.seed + 500_000 + update * 97 + e for e in range(n)])

        def new_episode() -> tuple[np.ndarray, Any]:
            nonlocal episodes
            s = _episode_seed(request.seed, rank, episodes)
            observations, infos = env.reset(seed=s)
            comm.reset(env, s)
            _check_team(env, layout, request.scenario)
            if list(env.agents) != layout.agents:
                raise ConcordError(f"scenario {request.scenario} started an episode without all its agents")
            return observations, infos

        def denormalise(v: np.ndarray) -> np.ndarray:
            v = v.astype(np.float64)
            return v * value_rms.std + value_rms.mean if value_rms is not None else v

        def critic_value(critic_in: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return denormalise(model.value(torch.from_numpy(critic_in)[None])[0].numpy())

        T, N = config.num_steps, layout.n
        D = layout.obs_dim + comm.message_size
        C = layout.state_size if algo_cls.centralised_critic else D
        A = layout.action_dim
        buf_obs = np.zeros((T, N, D), np.float32)
        buf_critic = np.zeros((T, N, C), np.float32)
        buf_deliv = np.zeros((T, N, N), bool) if comm.learned else None
        buf_amask = np.zeros((T, N, A), bool) if layout.kind == "discrete" else None
        buf_act = np.zeros((T, N) if layout.kind == "discrete" else (T, N, A), np.int64 if layout.kind == "discrete" else np.float32)
        buf_gate = np.zeros((T, N), np.int64)
        has_gate = False
        buf_logp = np.zeros((T, N), np.float32)
        buf_val = np.zeros((T, N), np.float64)
        buf_raw = np.zeros((T, N), np.float64)
        buf_boot = np.zeros((T, N), np.float64)
        buf_end = np.zeros(T, bool)

        observations, infos = new_episode()
        ep_return = np.zeros(N)
        returns_log: list[float] = []
        pending_train: list[tuple[float, dict[str, float]]] = []
        last_eval: list[dict[str, float]] = []
        eval_due = False
        busy_seconds = 0.0
        env_seconds = 0.0  # inside env.step / env.reset, to split env cost from learning overhead
        local_steps = 0
        start = time.perf_counter()
        last_ckpt: Path | None = None
        update = update0

        while env_steps < request.steps:
            world.maybe_inject_failure(update)
            tick = time.perf_counter()
            if config.anneal_lr:
                # Linear decay to 0 over the run (detail 4); continues correctly after --resume.
                optimizer.param_groups[0]["lr"] = config.learning_rate * max(0.0, 1.0 - env_steps / request.steps)
            model.eval()
            for t in range(T):
                obs = comm.augment(layout.obs_array(observations), env)
                delivered = comm.delivered(env)
                amask = layout.action_masks(infos, env)
                critic_in = np.asarray(env.state(), np.float32).ravel()[None].repeat(N, 0) \
                    if algo_cls.centralised_critic else obs
                action, logprob, cout, value = _act(model, obs, delivered, amask, False, critic_in)
                buf_obs[t], buf_critic[t], buf_logp[t] = obs, critic_in, logprob.numpy()
                buf_val[t] = denormalise(value.numpy())
                if delivered is not None:
                    buf_deliv[t] = delivered
                if amask is not None:
                    buf_amask[t] = amask
                buf_act[t] = action.numpy()
                if cout is not None:
                    comm.count_bytes(cout.bytes_sent)
                    if cout.gate is not None:
                        buf_gate[t], has_gate = cout.gate[0].numpy(), True
                env_action = model.clip_action(action).numpy()
                t_env = time.perf_counter()
                observations, rewards, terms, truncs, infos = env.step(layout.actions_dict(env_action))
                env_seconds += time.perf_counter() - t_env
                local_steps += 1
                raw = np.array([float(rewards.get(a, 0.0)) for a in layout.agents])
                ep_return += raw
                _check_team(env, layout, request.scenario)
                ended = not env.agents
                buf_raw[t], buf_boot[t] = raw, 0.0
                if ended:
                    # Time-limit truncation is not a terminal state: bootstrap with V(s_T)
                    # (Pardo et al. 2018, "Time Limits in Reinforcement Learning").
                    truncated = np.array([bool(truncs.get(a, False)) and not bool(terms.get(a, False))
                                          for a in layout.agents])
                    if truncated.any():
                        final = layout.obs_array(observations) if observations else np.zeros((N, layout.obs_dim), np.float32)
                        if algo_cls.centralised_critic:
                            final_c = np.asarray(env.state(), np.float32).ravel()[None].repeat(N, 0)
                        else:
                            final_c = np.concatenate([final, np.zeros((N, comm.message_size), np.float32)], 1) \
                                if comm.message_size else final
                        buf_boot[t] = config.gamma * critic_value(final_c) * truncated
                buf_end[t] = ended
                if ended:
                    kpis = {k: float(v) for k, v in env.episode_kpis().items()}
                    kpis.update(comm.stats())
                    episode_return = float(ep_return.mean())
                    returns_log.append(episode_return)
                    pending_train.append((episode_return, kpis))
                    episodes += 1
                    ep_return[:] = 0.0
                    if eval_due and world.is_root and request.periodic_eval_episodes > 0:
                        busy_seconds += time.perf_counter() - tick
                        last_eval = run_eval(update, request.periodic_eval_episodes)
                        tick = time.perf_counter()
                        _write_eval_rows(writer, row, update, last_eval)
                        progress(phase="eval", update=update, env_steps=env_steps,
                                 eval_return=float(np.mean([k["return"] for k in last_eval])),
                                 kpi_value=float(np.mean([k.get(main_kpi, np.nan) for k in last_eval])))
                    eval_due = False
                    t_env = time.perf_counter()
                    observations, infos = new_episode()
                    env_seconds += time.perf_counter() - t_env

            # ---- bootstrap value of the state after the rollout, then GAE
            if algo_cls.centralised_critic:
                last_c = np.asarray(env.state(), np.float32).ravel()[None].repeat(N, 0)
            else:
                # Rule-based messages of the next step are not drawn yet (that would advance the
                # channel): the last step's messages stand in for them.
                last_c = np.concatenate([layout.obs_array(observations), buf_obs[-1][:, layout.obs_dim:]], 1)
            last_value = critic_value(last_c)
            # Rewards are scaled once per rollout (same statistics as per-step scaling, fewer calls);
            # the truncation bootstrap is already in the critic's (scaled) units.
            buf_rew = (scaler.scale_rollout(buf_raw, buf_end) if scaler is not None else buf_raw) + buf_boot
            adv, ret = compute_gae(buf_rew, buf_val, buf_end, last_value, config.gamma, config.gae_lambda)
            values, returns = buf_val, ret
            if value_rms is not None:
                value_rms.update(ret)
                values = (buf_val - value_rms.mean) / value_rms.std
                returns = (ret - value_rms.mean) / value_rms.std
            batch = Batch(
                obs=torch.from_numpy(buf_obs.copy()),
                critic_in=torch.from_numpy(buf_critic.copy()),
                delivered=None if buf_deliv is None else torch.from_numpy(buf_deliv.copy()),
                action_mask=None if buf_amask is None else torch.from_numpy(buf_amask.copy()),
                actions=torch.from_numpy(buf_act.copy()),
                gates=torch.from_numpy(buf_gate.copy()) if has_gate else None,
                logprobs=torch.from_numpy(buf_logp.copy()),
                values=torch.from_numpy(values.astype(np.float32)),
                advantages=torch.from_numpy(adv.astype(np.float32)),
                returns=torch.from_numpy(returns.astype(np.float32)),
            )
            model.train()
            while True:
                try:
                    metrics = algo_cls.update(model, optimizer, batch, config, sync_grads=sync_grads)
                    metrics = world.mean_metrics(metrics)
                    break
                except rank_failure:
                    # A peer died (ULFM): survivors shrink, agree and re-broadcast the parameters
                    # from the lowest survivor; then this update is redone.
                    world.recover(model, optimizer)
                    per_update = config.num_steps * world.size
            update += 1
            env_steps += per_update
            busy_seconds += time.perf_counter() - tick
            sps = local_steps / busy_seconds if busy_seconds > 0 else 0.0

            # ---- log
            if writer is not None:
                rows = [row(update, f"train_{k}", v) for k, v in metrics.items()]
                rows.append(row(update, "train_env_steps", env_steps))
                rows.append(row(update, "train_steps_per_second", sps))
                rows.append(row(update, "train_env_time_fraction", env_seconds / busy_seconds))
                if pending_train:
                    rows.append(row(update, "train_return", np.mean([p[0] for p in pending_train])))
                    if main_kpi:
                        vals = [p[1][main_kpi] for p in pending_train if main_kpi in p[1]]
                        if vals:
                            rows.append(row(update, f"train_{main_kpi}", np.mean(vals)))
                for event in getattr(world, "events", [])[len(manifest["events"]):]:
                    rows.append(row(update, "rank_failure", float(event.get("rank", -1))))
                    manifest["events"].append(event)
                writer.append(rows)
            progress(phase="train", update=update, env_steps=env_steps, steps_per_second=sps,
                     episode_return=returns_log[-1] if returns_log else float("nan"),
                     kpi_value=pending_train[-1][1].get(main_kpi, float("nan")) if pending_train else float("nan"))
            pending_train = []
            finished = env_steps >= request.steps
            if config.eval_every and update % config.eval_every == 0 and not finished:
                eval_due = True

            # ---- checkpoint
            if update % config.checkpoint_every == 0 or finished:
                while True:  # a peer may die between the update and this agreement too
                    try:
                        agreed = world.agree(update)
                        break
                    except rank_failure:
                        world.recover(model, optimizer)
                if world.is_root:
                    state = {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "update": update,
                        "agreed_update": int(agreed),
                        "env_steps": env_steps,
                        "episodes": episodes,
                        "world_size": world.size,
                        "torch_rng": torch.get_rng_state(),
                        "meta": json.dumps(_meta(request, config, layout)),
                    }
                    if scaler is not None:
                        state["reward_scaler"] = scaler.state_dict()
                    if value_rms is not None:
                        state["value_norm"] = value_rms.state_dict()
                    last_ckpt = save_checkpoint(ckpt_dir, update, state, config.keep_checkpoints)
                    manifest.update(updates_completed=update, env_steps=env_steps, end_time=now_iso(),
                                    last_checkpoint=str(last_ckpt), agreed_update=int(agreed))
                    writer.write_manifest(run_id, manifest)

        # ---- final evaluation on marl run's seeds
        train_seconds = time.perf_counter() - start
        final: list[dict[str, float]] = []
        if world.is_root and request.eval_episodes > 0:
            final = evaluate(env, policy, [request.seed + e for e in range(request.eval_episodes)])
            writer.append(row(e, metric, value) for e, kpis in enumerate(final) for metric, value in kpis.items())
            progress(phase="eval", update=update, env_steps=env_steps,
                     eval_return=float(np.mean([k["return"] for k in final])),
                     kpi_value=float(np.mean([k.get(main_kpi, np.nan) for k in final])))
        sps = local_steps / busy_seconds if busy_seconds > 0 else 0.0
        final_kpis = {k: float(np.mean([f[k] for f in final])) for k in (final[0] if final else {})}
        manifest.update(end_time=now_iso(), updates_completed=update, env_steps=env_steps,
                        train_seconds=train_seconds, steps_per_second=sps, final_kpis=final_kpis,
                        env_time_fraction=env_seconds / busy_seconds if busy_seconds > 0 else None)
        if writer is not None:
            writer.write_manifest(run_id, manifest)
        return TrainResult(
            run_id=run_id, out_dir=out_dir, method=method, checkpoint=last_ckpt, updates=update,
            env_steps=env_steps, seconds=train_seconds, steps_per_second=sps, final_kpis=final_kpis,
            env_fraction=env_seconds / busy_seconds if busy_seconds > 0 else float("nan"),
            train_returns=returns_log, events=list(getattr(world, "events", [])),
        )
    finally:
        env.close()
        if world is not None:
            world.close()


def _write_eval_rows(writer: RecordWriter | None, row: Callable[..., Row], update: int,
                     results: list[dict[str, float]]) -> None:
    if writer is None or not results:
        return
    keys = results[0].keys()
    writer.append(row(update, f"eval_{k}", float(np.mean([r[k] for r in results]))) for k in keys)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use 'marl train'")
