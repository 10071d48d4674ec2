"""Training state that must reach every rank: at launch, and when ``--respawn`` admits a newcomer.

At launch every rank builds the same model from the same torch seed; rank 0's parameters and
optimiser state (a ``--resume`` loaded them there) are broadcast and checked to be identical,
and every rank logs under rank 0's run id (:func:`start_state`).

With ``--respawn`` (``marl train --fault-tolerance ulfm --respawn``) a rank lost to a failure is
replaced between updates (:func:`grow`): the survivors spawn and merge a new process
(:meth:`marl.distributed.world.MPIWorld.respawn`), which runs this very command; its ``train``
builds the scenario, the model and its envs like any rank, then, instead of restoring a
checkpoint, receives from rank 0 of the survivors (:func:`share_state`): parameters, buffers,
the optimiser state (Adam moments and step counts), the reward and value normalisers'
statistics, the counters (update, environment steps, evaluation due), the run id and the events
so far. Its training episodes and action sampling draw from their own stream,
``world.seed_stream`` = original rank + N x respawn round, so it never replays the episodes of
the rank it replaces. Its reward scaler's running returns start at zero: its episodes are new.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from marl.core.seeding import rank_seed
from marl.results.records import new_run_id

__all__ = ["start_state", "share_state", "grow"]


def share_state(
    world: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    value_rms: Any,
    counters: dict[str, Any] | None,
) -> dict[str, Any]:
    """Rank 0's parameters, optimiser state, normaliser statistics and ``counters`` on every rank
    (other ranks pass ``counters=None``); returns the counters. Collective over the world."""
    world.broadcast_state(model, optimizer)
    payload = None
    if counters is not None:
        payload = {
            **counters,
            "reward_stats": scaler.stats.state_dict() if scaler is not None else None,
            "value_norm": value_rms.state_dict() if value_rms is not None else None,
        }
    got = world.broadcast_json(payload)
    if counters is None:
        if scaler is not None and got.get("reward_stats"):
            scaler.stats.load_state_dict(got["reward_stats"])
        if value_rms is not None and got.get("value_norm"):
            value_rms.load_state_dict(got["value_norm"])
    world.check_identical(model)
    return dict(got)


def start_state(
    world: Any,
    plan: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    value_rms: Any,
    envs: Any,
    restore: Callable[[], tuple[int, int, bool]],
) -> tuple[int, int, bool, str]:
    """(update, env_steps, evaluation due, run id) at the start of training on this rank.

    A launched rank restores (``restore()``: the checkpoint, or fresh episodes) and takes rank
    0's state; a rank spawned by ``--respawn`` starts fresh episodes on its own seed stream and
    receives the survivors' state, counters and events (:func:`share_state`). Every rank logs
    under rank 0's run id into rank 0's output directory (``plan.out_dir`` is set to it: a
    default directory is named by the time, which differs between processes)."""
    seed = plan.request.seed
    if getattr(world, "newcomer", False):
        envs.start()
        envs.mark()
        got = share_state(world, model, optimizer, scaler, value_rms, None)
        world.events = list(got["events"])
        plan.out_dir = Path(got["out_dir"])
        torch.manual_seed(rank_seed(seed, world.seed_stream))
        return int(got["update"]), int(got["env_steps"]), bool(got["eval_due"]), str(got["run_id"])
    update, env_steps, eval_due = restore()
    world.broadcast_state(model, optimizer)
    world.check_identical(model)
    if world.rank > 0:
        torch.manual_seed(rank_seed(seed, world.seed_stream))  # different action sampling per rank
    # one run id and directory: any rank may end up writing its rows
    shared = world.broadcast_json({"run_id": new_run_id(), "out_dir": str(plan.out_dir)})
    plan.out_dir = Path(shared["out_dir"])
    return update, env_steps, eval_due, str(shared["run_id"])


def grow(
    world: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    value_rms: Any,
    **counters: Any,
) -> bool:
    """Between updates, with ``--respawn`` and ranks lost: spawn their replacements and hand them
    the state (``counters``: run_id, update, env_steps, eval_due). True when the world grew."""
    if not world.lost:
        return False
    joined = world.respawn(int(counters["update"]))
    if not joined:
        return False
    start = time.perf_counter()
    share_state(world, model, optimizer, scaler, value_rms, {**counters, "events": world.events})
    # The world is back to N once the newcomers hold the state (they build their model first).
    for event in joined:
        event["state_seconds"] = time.perf_counter() - start
        event["seconds_since_failure"] += event["state_seconds"]
    return True
