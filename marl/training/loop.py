"""The on-policy training loop (IPPO, MAPPO): rollout -> advantage -> update -> sync -> log -> checkpoint.

:func:`train` hands algorithms marked ``off_policy`` (IDQN) to :mod:`marl.training.offpolicy`.

One process runs one scenario instance (libsumo allows one simulation per process); with
``--envs K`` a rank also steps K - 1 more in worker processes, all K at once
(:class:`~marl.training.rollout.TrainingEpisodes`; every rollout array gets an env axis, GAE runs
per env, the update sees K x ``num_steps`` team samples); with ``--ranks N`` each MPI rank runs its
own instances and gradients are averaged across ranks by :mod:`marl.distributed` (one rank: its
one-rank world and no-op sync). Per update, on every rank::

    obs ──▶ actor (encoder ─▶ comms(h, channel mask) ─▶ head) ──▶ actions ──▶ env.step
    ... num_steps ... ──▶ GAE ──▶ PPO epochs (backward ─▶ sync_grads ─▶ clip ─▶ Adam step)
    ──▶ records rows ──▶ periodic evaluation / checkpoint when due

Communication in training is what evaluation sees (:mod:`marl.training.communication`).
``--steps`` counts environment steps over all envs and ranks (one step = every agent of one env
acts once). Seeds come from :mod:`marl.core.seeding`: training episodes from their own stream (one
per env), the final evaluation on ``marl run``'s episodes (on env 0). ``--resume`` restores
parameters, optimiser, normalisers, torch RNG, counters and the episodes in progress, so a
resumed one-rank run is bit-exact (with the same ``--envs``).

Fault tolerance (``--fault-tolerance ulfm``): a failed update is redone by the survivors from the
state before it (:func:`_with_recovery`); with ``--respawn`` replacements join between updates
and receive the live state (:mod:`marl.training.elastic`); ``--sync gossip`` and
``--sync-every K`` average parameters between updates (:mod:`marl.distributed.averaging`).

The pieces (layout, communication, model, buffer, checkpoint, evaluation, log) do not depend on
PPO: an off-policy algorithm can bring its own loop module and reuse them.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from marl.algos.ppo import RunningMeanStd
from marl.core import registry
from marl.core.errors import CheckpointError
from marl.core.seeding import rank_seed
from marl.policies import ActorCritic
from marl.training.buffer import EnvRewardScaler, RolloutBuffer, env_advantages
from marl.training.checkpoint import CHECKPOINT_DIR, checkpoint_meta, save_checkpoint
from marl.training.communication import Communication
from marl.training.elastic import grow, start_state
from marl.training.evaluation import evaluate, final_seeds, periodic_seeds
from marl.training.layout import TeamLayout
from marl.training.log import TrainLog
from marl.training.model import act, build_model, critic_input_size
from marl.training.policy import PolicyController
from marl.training.request import (
    TrainPlan,
    TrainRequest,
    TrainResult,
    check_ranks,
    prepare,
)
from marl.training.rollout import TrainingEpisodes

__all__ = ["train"]


def train(
    request: TrainRequest | TrainPlan, on_progress: Callable[[dict[str, Any]], None] | None = None
) -> TrainResult:
    """Train ``request.algo`` on ``request.scenario``; write records, checkpoints and a manifest.

    ``request`` may already be validated (:func:`~marl.training.request.prepare`, as the CLI does
    before printing anything). ``on_progress(info)`` is called after every update and evaluation
    with ``env_steps``, ``total_steps``, ``update``, ``steps_per_second``, ``episode_return``,
    ``kpi`` (name), ``kpi_value`` and ``phase`` ("train" | "eval").
    """
    # ---- setup
    from marl.distributed import DistConfig, RankFailure, init_world, make_sync
    from marl.distributed.averaging import make_averager

    plan = request if isinstance(request, TrainPlan) else prepare(request)
    if getattr(plan.algo_cls, "off_policy", False):  # replay-based learners (IDQN) have their own loop
        from marl.training.offpolicy import train_offpolicy

        return train_offpolicy(plan, on_progress)
    req, config, algo_cls = plan.request, plan.config, plan.algo_cls  # (Adam eps 1e-5: Huang et al. 2022, detail 3)
    torch.set_num_threads(config.torch_threads)
    env = registry.make_scenario(req.scenario, req.overrides, test=req.test)
    world, envs = None, None
    try:
        # Some scenarios know their state size and topology only after a reset.
        env.reset(seed=req.seed)
        layout = TeamLayout.of(env, req.scenario, need_state=algo_cls.centralised_critic)
        dist_cfg = req.dist if req.dist is not None else DistConfig()
        world = init_world(dist_cfg)
        # prescaled: the loss is multiplied by sync.grad_scale, so the allreduce needs no averaging pass.
        sync = make_sync(world, dist_cfg, env.topology, prescaled=True, training=True)
        averager = make_averager(world, dist_cfg)  # gossip / --sync-every K: parameters between updates
        check_ranks(config, world.size)
        torch.manual_seed(req.seed)  # identical initial weights on every rank
        comm = Communication.for_policy(req.protocol, plan.channel_spec, layout, rank_seed(req.seed, world.seed_stream),
                                        config)  # fmt: skip
        model = build_model(algo_cls, config, layout, comm)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, eps=1e-5, foreach=True)
        scaler = EnvRewardScaler(layout.n, config.gamma, req.envs) if config.norm_reward else None
        value_rms = RunningMeanStd() if config.norm_value else None
        envs = TrainingEpisodes.open(env, layout, comm, req, world.seed_stream, algo_cls.centralised_critic)
        restore = lambda: _restore(plan.resumed, model, optimizer, scaler, value_rms, envs, world.rank)
        update, env_steps, eval_due, run_id = start_state(world, plan, model, optimizer, scaler, value_rms, envs,
                                                          restore)  # fmt: skip
        log = TrainLog(plan, run_id, world, env, layout, update, env_steps, on_progress)
        last_update = _last_update(req, config, len(envs), world, averager)
        policy = PolicyController(model, layout, comm, plan.method, deterministic=config.deterministic_eval)
        buf = RolloutBuffer.for_team(config.num_steps, layout, comm, critic_input_size(algo_cls, layout, comm),
                                     req.envs)  # fmt: skip
        returns: list[float] = []  # of every finished training episode
        finished: list[tuple[float, dict[str, float]]] = []  # (return, kpis) during this update
        busy = rollout_seconds = 0.0  # rollout + update time; rollout only (envs.seconds: inside the envs)
        local_steps, last_ckpt, start = 0, None, time.perf_counter()

        while env_steps < req.steps and update < last_update:
            # ---- rollout (with --respawn, replacements for lost ranks join first and get the state)
            grow(world, model, optimizer, scaler, value_rms, run_id=run_id, update=update, env_steps=env_steps,
                 eval_due=eval_due, out_dir=str(plan.out_dir))  # fmt: skip
            world.maybe_inject_failure(update)
            tick = time.perf_counter()
            if config.anneal_lr:  # linear decay to 0 over the run (detail 4), also after --resume
                optimizer.param_groups[0]["lr"] = config.learning_rate * max(0.0, 1.0 - env_steps / req.steps)
            model.eval()
            for t in range(config.num_steps):  # every array has a leading env axis [K, N, ...]
                obs, delivered, amask, critic_in = envs.inputs()
                action, logprob, cout, value = act(model, obs, delivered, amask, False, critic_in)
                if cout is not None:
                    envs.count_bytes(cout.bytes_sent)
                gate = None if cout is None or cout.gate is None else cout.gate.numpy()
                v = _denormalise(value.numpy(), value_rms)
                buf.store(t, obs, critic_in, delivered, amask, action.numpy(), logprob.numpy(), v, gate)
                outs = envs.step(model.clip_action(action).numpy())  # the K envs step at once
                local_steps += len(outs)
                buf.record(t, outs, [_bootstrap(model, out, config.gamma, value_rms) for out in outs])
                ended = [k for k, out in enumerate(outs) if out.ended]
                for k in ended:
                    returns.append(float(envs.episodes[k].episode_return.mean()))
                    finished.append((returns[-1], envs.episodes[k].kpis()))
                if 0 in ended and eval_due and world.is_root and req.periodic_eval_episodes > 0:
                    busy += time.perf_counter() - tick  # evaluation (on env 0) is not training time
                    seeds = periodic_seeds(req.seed, update, req.periodic_eval_episodes)
                    log.eval_rows(update, evaluate(env, policy, seeds), env_steps)
                    tick = time.perf_counter()
                eval_due = eval_due and 0 not in ended
                envs.start(ended)
            rollout_seconds += time.perf_counter() - tick

            # ---- advantage: GAE per env on scaled rewards; the truncation bootstrap is already in critic units
            last_value = _value(model, envs.critic_after(buf.obs[-1]), value_rms)
            rewards = (scaler.scale_rollout(buf.raw, buf.end) if scaler is not None else buf.raw) + buf.boot
            adv, ret = env_advantages(rewards, buf.values, buf.end, last_value, config.gamma, config.gae_lambda)
            values, targets = buf.values, ret
            if value_rms is not None:
                value_rms.update(ret)
                values, targets = value_rms.normalise(buf.values), value_rms.normalise(ret)
            batch = buf.batch(values, adv, targets)

            # ---- update and sync: a peer's death (ULFM) makes the survivors shrink, re-broadcast
            # the lowest survivor's parameters and redo the update with the new world's scale;
            # every K updates one averaging round of the parameters (gossip: root-free, survives dead peers)
            model.train()
            metrics = _learn(world, model, optimizer, RankFailure, algo_cls, batch, config, sync, averager, update)
            update += 1
            env_steps += config.num_steps * len(envs) * world.size
            busy += time.perf_counter() - tick

            # ---- log
            last_return = returns[-1] if returns else float("nan")
            log.update_rows(update, metrics, env_steps, local_steps / busy, envs.seconds / busy, finished,
                            world.events, last_return)  # fmt: skip
            finished = []
            done = env_steps >= req.steps or update >= last_update
            # due evaluations run at the next episode end (a rollout may end none)
            eval_due = eval_due or bool(config.eval_every and update % config.eval_every == 0 and not done)

            # ---- checkpoint (every rank agrees on the update first; a peer may die here too)
            if update % config.checkpoint_every == 0 or done:
                agreed = _agreed(world, model, optimizer, RankFailure, averager, update)
                if world.is_root:
                    state = _state(plan, layout, run_id, model, optimizer, scaler, value_rms, envs, update,
                                   agreed, env_steps, world.size, eval_due)  # fmt: skip
                    last_ckpt = save_checkpoint(plan.out_dir / CHECKPOINT_DIR, update, state, config.keep_checkpoints,
                                                during_write=partial(world.maybe_inject_failure, update, "checkpoint"))  # fmt: skip
                    log.save_manifest(updates_completed=update, env_steps=env_steps,
                                      last_checkpoint=str(last_ckpt), agreed_update=int(agreed))  # fmt: skip

        # ---- final evaluation on marl run's episodes
        train_seconds = time.perf_counter() - start
        final: list[dict[str, float]] = []
        if world.is_root and req.eval_episodes > 0:
            final = evaluate(env, policy, final_seeds(req.seed, req.eval_episodes))
            log.final_rows(update, final, env_steps)
        sps, rollout_sps = (local_steps / s if s > 0 else 0.0 for s in (busy, rollout_seconds))
        fraction = envs.seconds / busy if busy > 0 else float("nan")
        final_kpis = {k: float(np.mean([f[k] for f in final])) for k in (final[0] if final else {})}
        log.save_manifest(updates_completed=update, env_steps=env_steps, train_seconds=train_seconds,
                          steps_per_second=sps, rollout_steps_per_second=rollout_sps, final_kpis=final_kpis,
                          env_time_fraction=None if np.isnan(fraction) else fraction,
                          cpu_seconds=envs.cpu_seconds(), identical_checks=world.identical_checks)  # fmt: skip
        return TrainResult(run_id=run_id, out_dir=plan.out_dir, method=plan.method, checkpoint=last_ckpt,
                           updates=update, env_steps=env_steps, seconds=train_seconds, steps_per_second=sps,
                           final_kpis=final_kpis, env_fraction=fraction, train_returns=returns,
                           events=list(world.events), rollout_steps_per_second=rollout_sps)  # fmt: skip
    finally:
        if envs is not None:
            envs.close()  # the worker envs
        env.close()
        if world is not None:
            world.close()


def _denormalise(v: np.ndarray, value_rms: RunningMeanStd | None) -> np.ndarray:
    """Critic output in reward units (the critic learns normalised returns when value_rms is set)."""
    v = v.astype(np.float64)
    return value_rms.denormalise(v) if value_rms is not None else v


def _value(model: ActorCritic, critic_in: np.ndarray, value_rms: RunningMeanStd | None) -> np.ndarray:
    """V(s) [N] in reward units for one step's critic input [N, C] (or [K, N] for [K, N, C])."""
    with torch.inference_mode():
        if critic_in.ndim == 3:
            return _denormalise(model.value(torch.from_numpy(critic_in)).numpy(), value_rms)
        return _denormalise(model.value(torch.from_numpy(critic_in)[None])[0].numpy(), value_rms)


def _bootstrap(model: ActorCritic, out: Any, gamma: float, value_rms: RunningMeanStd | None) -> Any:
    """gamma * V(s_T) for agents whose episode was truncated by the time limit, else 0: a time
    limit is not a terminal state (Pardo et al. 2018, "Time Limits in Reinforcement Learning")."""
    if out.final_critic_in is None:
        return 0.0
    return gamma * _value(model, out.final_critic_in, value_rms) * out.truncated


def _with_recovery(
    world: Any,
    model: ActorCritic,
    optimizer: torch.optim.Optimizer,
    failure: type[Exception],
    collective: Callable[..., Any],
    *args: Any,
) -> Any:
    """``collective(*args)`` as one all-or-nothing phase: after a rank failure, every survivor
    recovers the world and calls it again.

    A PPO update is many optimiser steps, each behind a gradient allreduce: a peer dying in the
    middle leaves the survivors with the first steps applied. Redoing the update on top of them
    would apply those steps twice, so under ULFM every rank keeps a copy of the parameters and
    optimiser state from before the call and puts it back before recovering; the survivors, all
    holding that same state, then redo the whole update in the shrunk world.

    A peer dying inside the phase's *last* collective can let some survivors complete it and not
    others (with 4 ranks, recursive doubling pairs 1 with 3 in its last step, without rank 0):
    the ones that completed would go on to the next update while the others redo this one, and
    from then on their collectives no longer match. So the phase ends with ULFM's agreement
    (:meth:`~marl.distributed.world.MPIWorld.commit`), which is uniform: either every survivor
    learns that every rank completed the phase, or every survivor learns that one did not, and
    then all of them put their copy back, recover and redo it together.
    """
    ulfm = getattr(world, "ulfm", False)
    while True:
        before = copy.deepcopy((model.state_dict(), optimizer.state_dict())) if ulfm else None
        try:
            result, completed = collective(*args), True
        except failure:
            if not ulfm:
                raise
            result, completed = None, False
        if before is None or world.commit(completed):
            return result
        model.load_state_dict(before[0])
        optimizer.load_state_dict(before[1])
        world.recover(model, optimizer)


def _learn(
    world: Any,
    model: ActorCritic,
    optimizer: torch.optim.Optimizer,
    failure: type[Exception],
    algo_cls: Any,
    batch: Any,
    config: Any,
    sync: Any,
    averager: Any,
    update: int,
) -> dict[str, float]:
    """Update ``update + 1``, its gradient sync and the parameter averaging round when one is due
    (bytes in ``param_sync_bytes``), as one phase that a failure makes every survivor redo
    (:func:`_with_recovery`). Root-free push-sum gossip runs no collective over all ranks: its
    update is local and its averager handles failures itself."""

    def phase() -> dict[str, float]:
        metrics = _update(algo_cls, model, optimizer, batch, config, sync, world, averager)
        metrics["param_sync_bytes"] = float(averager(model, update + 1))
        return metrics

    return phase() if averager.root_free else _with_recovery(world, model, optimizer, failure, phase)


def _agreed(
    world: Any,
    model: ActorCritic,
    optimizer: torch.optim.Optimizer,
    failure: type[Exception],
    averager: Any,
    update: int,
) -> int:
    """The update every rank completed (ULFM's agreement; a peer may die here too), after checking
    that every rank holds bit-identical parameters (RanksDivergedError otherwise; with
    ``--sync-every K`` only after an averaging round). Root-free gossip writes its own state
    without a collective: the update itself."""
    if averager.root_free:
        return update
    if update % averager.every == 0:
        _with_recovery(world, model, optimizer, failure, world.check_identical, model)
    return int(_with_recovery(world, model, optimizer, failure, world.agree, update))


def _update(
    algo_cls: Any,
    model: ActorCritic,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    config: Any,
    sync: Any,
    world: Any,
    averager: Any,
) -> dict[str, float]:
    """The algorithm's update on this rank's batch, gradients synced; metrics averaged over ranks
    (root-free gossip: this rank's own, no collective). The loss scale is read per call: a
    recovery may have shrunk the world."""
    metrics = algo_cls.update(model, optimizer, batch, config, sync_grads=sync, grad_scale=sync.grad_scale)
    return metrics if averager.root_free else world.mean_metrics(metrics)


def _last_update(req: Any, config: Any, envs: int, world: Any, averager: Any) -> float:
    """The update count that ends training, besides ``--steps``: root-free gossip runs a fixed
    number, ``steps / (num_steps x envs x ranks at launch)`` rounded up, so that every rank stops
    after the same update without a collective (a failure makes the world smaller, and ranks
    notice it at different updates); otherwise unlimited (the ranks count steps in lockstep)."""
    if not averager.root_free:
        return float("inf")
    size = getattr(world, "original_size", world.size)
    return float(-(-req.steps // (config.num_steps * envs * size)))


def _state(
    plan: TrainPlan,
    layout: TeamLayout,
    run_id: str,
    model: ActorCritic,
    optimizer: torch.optim.Optimizer,
    scaler: EnvRewardScaler | None,
    value_rms: RunningMeanStd | None,
    envs: TrainingEpisodes,
    update: int,
    agreed: int,
    env_steps: int,
    world_size: int,
    eval_due: bool,
) -> dict[str, Any]:
    """Everything a checkpoint holds (see :mod:`marl.training.checkpoint` for the format)."""
    state: dict[str, Any] = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "update": update,
        "agreed_update": int(agreed),
        "env_steps": env_steps,
        "episodes": envs.episodes[0].episodes_done,
        "world_size": world_size,
        "torch_rng": torch.get_rng_state(),
        "run_id": run_id,
        "episode": envs.episodes[0].state_dict(),
        "envs": len(envs),  # --resume needs the same --envs (checked by prepare)
        "env_episodes": envs.worker_states(),
        "eval_due": eval_due,
        "meta": json.dumps(checkpoint_meta(plan.request, plan.config, layout)),
    }
    if scaler is not None:
        state["reward_scaler"] = scaler.state_dict()
    if value_rms is not None:
        state["value_norm"] = value_rms.state_dict()
    return state


def _restore(
    resumed: dict[str, Any] | None,
    model: ActorCritic,
    optimizer: torch.optim.Optimizer,
    scaler: EnvRewardScaler | None,
    value_rms: RunningMeanStd | None,
    envs: TrainingEpisodes,
    rank: int,
) -> tuple[int, int, bool]:
    """Load a checkpoint into the fresh learner and episode stream (or start the first episodes);
    returns (update, env_steps, evaluation due). ``--envs`` is the checkpoint's (checked by prepare)."""
    if resumed is None:
        envs.start()
        envs.mark()  # env time and CPU count from the first rollout
        return 0, 0, False
    episode = envs.episodes[0]
    try:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {resumed['path']} does not fit: {str(exc).splitlines()[0]}") from None
    if scaler is not None and "reward_scaler" in resumed:
        scaler.load_state_dict(resumed["reward_scaler"])
    if value_rms is not None and "value_norm" in resumed:
        value_rms.load_state_dict(resumed["value_norm"])
    if rank == 0 and "torch_rng" in resumed:
        torch.set_rng_state(resumed["torch_rng"])
    episode.episodes_done = int(resumed["episodes"])
    if rank == 0 and "episode" in resumed:
        episode.load_state_dict(resumed["episode"])  # replay the episode that was running
    else:
        episode.start()  # checkpoints written before episodes were saved: a fresh episode
    envs.load_worker_states(resumed.get("env_episodes") if rank == 0 else None)
    envs.mark()
    return int(resumed["update"]), int(resumed["env_steps"]), bool(resumed.get("eval_due", False))
