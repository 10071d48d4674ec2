"""The off-policy training loop (IDQN): act epsilon-greedily -> n-step transition -> replay -> update.

One process runs one scenario instance (plus K - 1 in worker processes with ``--envs K``). Per
environment step::

    obs (+ rule-based messages) ──▶ Q-network ──▶ masked epsilon-greedy actions ──▶ env.step
    ──▶ n-step assembler ──▶ replay ring ──▶ every train_every steps: sample a batch ──▶ double-DQN
    step (backward ─▶ clip ─▶ Adam); every target_update_every steps: copy online ─▶ target

Every ``num_steps`` env steps is one *iteration*: one row of training records (the ``episode``
column holds the iteration number, as PPO's update number), and the unit of ``eval_every`` and
``checkpoint_every``. Evaluation runs at the end of a training episode (libsumo holds one
simulation per process, so evaluating resets the env), on the seeds of :mod:`marl.core.seeding`:
training episodes from their own stream, the final evaluation on ``marl run``'s episodes.

``--resume`` restores the online and target networks, Adam, the replay buffer (unless
``save_replay=false``), the pending n-step steps, the numpy generator that draws exploration and
batches, the counters and the episode in progress (replayed, :mod:`marl.training.rollout`), so a
resumed run is bit-exact. Without a saved replay buffer the resumed run starts from an empty one
and says so on stderr: it is then a different run (fewer samples to learn from for a while).

With ``--envs K`` the K envs (:class:`marl.training.rollout.TrainingEpisodes`) act in one forward
and step at once; an iteration is ``num_steps`` steps of every env (K x ``num_steps`` env steps, as
a PPO rollout); each env has its own n-step assembler and feeds the one replay ring; counting K
env steps per loop step keeps ``train_every`` and ``target_update_every`` in env steps (a
gradient step per ``train_every`` env steps, whatever K). Evaluation runs at env 0's episode ends.
A checkpoint also holds envs 1..K-1's episodes and n-step windows, so such a run resumes exactly.

Learned protocols and several MPI ranks are PPO-only; :func:`marl.training.request.prepare`
refuses them for off-policy algorithms before anything starts.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from marl.algos.idqn import NStepAssembler, ReplayBuffer, epsilon_at, select_actions
from marl.core import registry
from marl.core.errors import CheckpointError, ConfigError
from marl.results.records import new_run_id
from marl.training.checkpoint import CHECKPOINT_DIR, checkpoint_meta, save_checkpoint
from marl.training.communication import Communication
from marl.training.evaluation import evaluate, final_seeds, periodic_seeds
from marl.training.layout import TeamLayout
from marl.training.log import TrainLog
from marl.training.model import build_model
from marl.training.policy import PolicyController
from marl.training.request import TrainPlan, TrainResult, guide_class
from marl.training.rollout import TrainingEpisode, TrainingEpisodes

__all__ = ["train_offpolicy"]

#: Entropy word of the generator that draws exploration and replay batches (apart from the
#: seeding streams of :mod:`marl.core.seeding`).
EXPLORE = 0x4451  # "DQ"


@dataclass
class Learner:
    """Everything that learns, and what a checkpoint must restore to continue exactly."""

    model: Any  #: online Q-network
    target: Any  #: target Q-network (a frozen copy, refreshed every target_update_every steps)
    optimizer: torch.optim.Optimizer
    replay: ReplayBuffer
    nstep: NStepAssembler
    rng: np.random.Generator  #: exploration and batch sampling
    env_nsteps: list[NStepAssembler] = field(default_factory=list)  #: envs 1..K-1's (--envs K)
    update: int = 0  #: iterations completed
    env_steps: int = 0
    grad_steps: int = 0
    eval_due: bool = False


def train_offpolicy(plan: TrainPlan, on_progress: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train an off-policy algorithm (``plan.algo_cls.off_policy``); same outputs as
    :func:`marl.training.loop.train`: records, checkpoints, manifest and a :class:`TrainResult`."""
    req, config, algo_cls = plan.request, plan.config, plan.algo_cls
    torch.set_num_threads(config.torch_threads)
    guide_cls = guide_class(req.scenario, config.guide, req.envs)
    env = registry.make_scenario(req.scenario, req.overrides, test=req.test)
    envs = None
    try:
        env.reset(seed=req.seed)  # some scenarios know their spaces only after a reset
        layout = TeamLayout.of(env, req.scenario, need_state=False)
        if layout.kind != "discrete":
            raise ConfigError(
                f"bad --algo {req.algo} for {req.scenario}: its actions are continuous (Box); allowed: ippo or mappo"
            )
        torch.manual_seed(req.seed)
        comm = Communication(
            req.protocol, plan.channel_spec, layout.agents, layout.obs_dim, req.seed, hidden_size=config.hidden_size
        )
        model = build_model(algo_cls, config, layout, comm)
        target = copy.deepcopy(model).requires_grad_(False)
        learner = Learner(
            model,
            target,
            torch.optim.Adam(model.parameters(), lr=config.learning_rate, foreach=True),
            ReplayBuffer(config.buffer_size, layout.n, layout.obs_dim + comm.message_size, layout.action_dim),
            NStepAssembler(config.n_step, config.gamma),
            np.random.default_rng(np.random.SeedSequence([req.seed, EXPLORE])),
        )
        envs = TrainingEpisodes.open(env, layout, comm, req, 0, False)
        learner.env_nsteps = [NStepAssembler(config.n_step, config.gamma) for _ in range(req.envs - 1)]
        _restore(plan.resumed, learner, envs)
        run_id = new_run_id()
        log = TrainLog(plan, run_id, None, env, layout, learner.update, learner.env_steps, on_progress)
        policy = PolicyController(model, layout, comm, plan.method, deterministic=config.deterministic_eval)
        guide = None if guide_cls is None else guide_cls(env, None)
        return _run(plan, env, layout, envs, learner, log, policy, run_id, guide)
    finally:
        if envs is not None:
            envs.close()  # the worker envs
        env.close()


def _run(
    plan: TrainPlan,
    env: Any,
    layout: TeamLayout,
    envs: TrainingEpisodes,
    ln: Learner,
    log: TrainLog,
    policy: PolicyController,
    run_id: str,
    guide: Any = None,
) -> TrainResult:
    """The loop itself, top to bottom (setup and teardown are :func:`train_offpolicy`); ``guide``:
    the classical controller exploring agents follow (``--algo-set guide=NAME``), or None."""
    req, config, algo_cls = plan.request, plan.config, plan.algo_cls
    returns: list[float] = []  # of every finished training episode
    finished: list[tuple[float, dict[str, float]]] = []  # (return, kpis) during this iteration
    busy = 0.0  # acting + learning time (envs.seconds: the part of it inside the envs)
    local_steps, last_ckpt, start = 0, None, time.perf_counter()
    nsteps = [ln.nstep, *ln.env_nsteps]  # one n-step assembler per env (--envs K)
    obs, amask = _stack([_inputs(ep) for ep in envs.episodes])  # [K, N, ...]
    if guide is not None:
        guide.reset(env)

    while ln.env_steps < req.steps:
        tick = time.perf_counter()
        sums: dict[str, float] = {}
        updates_here = 0
        for _ in range(config.num_steps):
            # ---- act: masked epsilon-greedy on the online network, the K envs in one forward
            eps = epsilon_at(ln.env_steps, req.steps, config)
            with torch.inference_mode():
                q = ln.model(torch.from_numpy(obs)).numpy()
            # The guide's actions: followed by exploring agents, and stored for the margin loss.
            needed = guide is not None and (eps > 0 or config.guide_margin > 0)
            hint = _guide_actions(guide, envs.episodes[0], env, layout) if needed else None
            action = np.stack(
                [select_actions(q[k], amask[k], eps, ln.rng, hint, config.guide_share) for k in range(len(envs))]
            )
            outs = envs.step(action)  # the K envs step at once
            local_steps += len(outs)
            ln.env_steps += len(outs)

            # ---- store: each env's n-step transitions into the replay ring
            following = [_store(nsteps[k], ln.replay, layout, envs.episodes[k], obs[k], action[k], out, hint)
                         for k, out in enumerate(outs)]  # fmt: skip
            ended = [k for k, out in enumerate(outs) if out.ended]
            for k in ended:
                returns.append(float(envs.episodes[k].episode_return.mean()))
                finished.append((returns[-1], envs.episodes[k].kpis()))
            if 0 in ended and ln.eval_due and req.periodic_eval_episodes > 0:
                busy += time.perf_counter() - tick  # evaluation (on env 0) is not training time
                log.eval_rows(
                    ln.update,
                    evaluate(env, policy, periodic_seeds(req.seed, ln.update, req.periodic_eval_episodes)),
                    ln.env_steps,
                )
                tick = time.perf_counter()
            ln.eval_due = ln.eval_due and 0 not in ended
            envs.start(ended)
            if guide is not None and 0 in ended:
                guide.reset(env)  # a new episode (and after an evaluation, which drove the env itself)
            obs, amask = _stack([f if f is not None else _inputs(envs.episodes[k]) for k, f in enumerate(following)])

            # ---- learn: one double-DQN step per train_every env steps, then the target copy
            for _ in range(_crossed(ln.env_steps, len(outs), config.train_every)):
                if ln.env_steps > config.learning_starts and ln.replay.size >= config.batch_size:
                    metrics = algo_cls.update(
                        ln.model, ln.target, ln.optimizer, ln.replay.sample(config.batch_size, ln.rng), config
                    )
                    for key, value in metrics.items():
                        sums[key] = sums.get(key, 0.0) + value
                    updates_here += 1
                    ln.grad_steps += 1
            if _crossed(ln.env_steps, len(outs), config.target_update_every):
                ln.target.load_state_dict(ln.model.state_dict())
            if ln.env_steps >= req.steps:
                break

        # ---- log one iteration
        ln.update += 1
        busy += time.perf_counter() - tick
        metrics = {k: v / updates_here for k, v in sums.items()}
        metrics.update(
            epsilon=epsilon_at(ln.env_steps, req.steps, config),
            grad_steps=float(ln.grad_steps),
            replay_size=float(ln.replay.size),
        )
        log.update_rows(
            ln.update,
            metrics,
            ln.env_steps,
            local_steps / busy,
            envs.seconds / busy,
            finished,
            [],
            returns[-1] if returns else float("nan"),
        )
        finished = []
        done = ln.env_steps >= req.steps
        ln.eval_due = ln.eval_due or bool(config.eval_every and ln.update % config.eval_every == 0 and not done)

        # ---- checkpoint
        if ln.update % config.checkpoint_every == 0 or done:
            last_ckpt = save_checkpoint(
                plan.out_dir / CHECKPOINT_DIR,
                ln.update,
                _state(plan, layout, run_id, ln, envs),
                config.keep_checkpoints,
            )
            log.save_manifest(
                updates_completed=ln.update,
                env_steps=ln.env_steps,
                last_checkpoint=str(last_ckpt),
                agreed_update=ln.update,
            )

    # ---- final evaluation on marl run's episodes
    train_seconds = time.perf_counter() - start
    final_eval: list[dict[str, float]] = []
    if req.eval_episodes > 0:
        final_eval = evaluate(env, policy, final_seeds(req.seed, req.eval_episodes))
        log.final_rows(ln.update, final_eval, ln.env_steps)
    sps = local_steps / busy if busy > 0 else 0.0
    fraction = envs.seconds / busy if busy > 0 else float("nan")
    final_kpis = {k: float(np.mean([f[k] for f in final_eval])) for k in (final_eval[0] if final_eval else {})}
    log.save_manifest(
        updates_completed=ln.update,
        env_steps=ln.env_steps,
        train_seconds=train_seconds,
        steps_per_second=sps,
        final_kpis=final_kpis,
        grad_steps=ln.grad_steps,
        env_time_fraction=None if np.isnan(fraction) else fraction,
        cpu_seconds=envs.cpu_seconds(),
    )
    return TrainResult(
        run_id=run_id,
        out_dir=plan.out_dir,
        method=plan.method,
        checkpoint=last_ckpt,
        updates=ln.update,
        env_steps=ln.env_steps,
        seconds=train_seconds,
        steps_per_second=sps,
        final_kpis=final_kpis,
        env_fraction=fraction,
        train_returns=returns,
    )


def _guide_actions(guide: Any, episode: TrainingEpisode, env: Any, layout: TeamLayout) -> np.ndarray:
    """The guide's action per agent ``[N]`` (layout order) for the episode's current observations."""
    chosen = guide.act(episode.observations, env)
    return np.array([int(chosen[a]) for a in layout.agents])


def _store(
    nstep: NStepAssembler, replay: ReplayBuffer, layout: TeamLayout, episode: TrainingEpisode, obs: np.ndarray,
    action: np.ndarray, out: Any, guide: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray] | None:  # fmt: skip
    """One env's step into its n-step assembler and the replay ring; returns the next step's
    (actor input, action mask), or None when the episode ended (the caller starts the next)."""
    if out.ended:
        final = out.final_critic_in if out.final_critic_in is not None else np.zeros_like(obs)
        final_mask = _mask(layout.action_masks(episode.infos, episode.env))
        for tr in nstep.end(obs, action, out.reward, final, final_mask, ~out.truncated, guide):
            replay.add(tr)
        return None
    next_obs, next_mask = _inputs(episode)
    for tr in nstep.push(obs, action, out.reward, next_obs, next_mask, guide):
        replay.add(tr)
    return next_obs, next_mask


def _inputs(episode: TrainingEpisode) -> tuple[np.ndarray, np.ndarray]:
    """(actor input [N, D], action mask [N, A]) of the env's next step (draws its messages)."""
    obs, _, mask, _ = episode.inputs()
    return obs, _mask(mask)


def _stack(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-env (actor input, action mask) pairs as ([K, N, D], [K, N, A])."""
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _crossed(env_steps: int, stepped: int, every: int) -> int:
    """How many multiples of ``every`` the count passed in its last ``stepped`` steps (with one
    env: 1 exactly when ``env_steps % every == 0``)."""
    return env_steps // every - (env_steps - stepped) // every


def _mask(mask: np.ndarray | None) -> np.ndarray:
    """A discrete team's action mask (the loop refuses continuous actions, so it always exists)."""
    assert mask is not None
    return mask


def _state(plan: TrainPlan, layout: TeamLayout, run_id: str, ln: Learner, envs: TrainingEpisodes) -> dict[str, Any]:
    """Everything a checkpoint holds (format of :mod:`marl.training.checkpoint`, plus ``target``,
    ``replay`` (when ``save_replay``), ``nstep``, ``rng`` (JSON) and ``grad_steps``; with
    ``--envs K`` also ``envs``, ``env_episodes`` and ``env_nsteps`` of envs 1..K-1)."""
    episode = envs.episodes[0]
    state: dict[str, Any] = {
        "model": ln.model.state_dict(),
        "target": ln.target.state_dict(),
        "optimizer": ln.optimizer.state_dict(),
        "update": ln.update,
        "agreed_update": ln.update,
        "env_steps": ln.env_steps,
        "grad_steps": ln.grad_steps,
        "episodes": episode.episodes_done,
        "world_size": 1,
        "torch_rng": torch.get_rng_state(),
        "run_id": run_id,
        "episode": episode.state_dict(),
        "eval_due": ln.eval_due,
        "nstep": ln.nstep.state_dict(),
        "envs": len(envs),
        "env_episodes": envs.worker_states(),
        "env_nsteps": [n.state_dict() for n in ln.env_nsteps],
        "rng": json.dumps(ln.rng.bit_generator.state),
        "meta": json.dumps(checkpoint_meta(plan.request, plan.config, layout)),
    }
    if plan.config.save_replay:
        state["replay"] = ln.replay.state_dict()
    return state


def _restore(resumed: dict[str, Any] | None, ln: Learner, envs: TrainingEpisodes) -> None:
    """Load a checkpoint into the fresh learner and replay the episode in progress (or start the
    first episodes). ``--envs`` is the checkpoint's (checked by prepare)."""
    if resumed is None:
        envs.start()
        envs.mark()  # env time and CPU count from the first step
        return
    episode = envs.episodes[0]
    try:
        ln.model.load_state_dict(resumed["model"])
        ln.target.load_state_dict(resumed["target"])
        ln.optimizer.load_state_dict(resumed["optimizer"])
        ln.nstep.load_state_dict(resumed["nstep"])
        for nstep, saved in zip(ln.env_nsteps, resumed.get("env_nsteps", []), strict=True):
            nstep.load_state_dict(saved)
        ln.rng.bit_generator.state = json.loads(resumed["rng"])
        if "replay" in resumed:
            ln.replay.load_state_dict(resumed["replay"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {resumed['path']} does not fit: {str(exc).splitlines()[0]}") from None
    if "replay" not in resumed:
        sys.stderr.write(
            f"warning: checkpoint {resumed['path']} holds no replay buffer (save_replay=false); "
            "resuming with an empty one, so this run will not match an uninterrupted one\n"
        )
    torch.set_rng_state(resumed["torch_rng"])
    ln.update, ln.env_steps = int(resumed["update"]), int(resumed["env_steps"])
    ln.grad_steps, ln.eval_due = int(resumed["grad_steps"]), bool(resumed.get("eval_due", False))
    episode.episodes_done = int(resumed["episodes"])
    episode.load_state_dict(resumed["episode"])  # replay the episode that was running
    envs.load_worker_states(resumed.get("env_episodes"))
    envs.mark()
