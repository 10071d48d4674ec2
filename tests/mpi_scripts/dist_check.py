"""Run under mpiexec by tests/test_distributed.py: exercises marl.distributed on real ranks.

Every rank prints one line ``RESULT <json>``. Expected values are recomputed locally: rank r's
data is a deterministic function of r, so each rank can rebuild every other rank's gradient
without communicating, and the tests compare MPI results against that.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from marl.core.errors import ConcordError
from marl.distributed import DistConfig, RankFailure, init_world, make_sync


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return model.to(dtype)


def local_grads(
    model: torch.nn.Module, rank: int, step: int, scale: float = 1.0, set_to_none: bool = True
) -> list[torch.Tensor]:
    """The gradient rank ``rank`` computes at ``step`` (deterministic in rank and step), of the
    loss times ``scale`` (the sync's ``grad_scale``, applied as marl train does)."""
    gen = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(8, 6, generator=gen).to(next(model.parameters()).dtype)
    y = torch.randn(8, 3, generator=gen).to(x.dtype)
    model.zero_grad(set_to_none=set_to_none)
    loss = ((model(x) - y) ** 2).mean()
    (loss * scale).backward()
    return [p.grad.detach().float().clone() for p in model.parameters()]


def mean_of_ranks(model: torch.nn.Module, size: int, step: int) -> list[torch.Tensor]:
    """The mean over ranks 0..size-1 of their unscaled local gradients (recomputed locally)."""
    expected = [torch.zeros_like(g) for g in local_grads(model, 0, step)]
    for r in range(size):
        for e, g in zip(expected, local_grads(model, r, step)):
            e += g / size
    return expected


def grad_error(model: torch.nn.Module, expected: list[torch.Tensor]) -> float:
    return max(float((p.grad.float() - e).abs().max()) for p, e in zip(model.parameters(), expected))


def check_mean(world, cfg: DistConfig, updates: int, dtype=torch.float32, prescaled: bool = True) -> dict:
    """Synced gradients equal the mean of every rank's local gradient; with ``prescaled`` the
    loss is scaled by ``sync.grad_scale`` first, exactly as the training loop does."""
    sync = make_sync(world, cfg, prescaled=prescaled)
    model = make_model(dtype)
    world.broadcast_state(model)
    errors, out = [], {"grad_scale": sync.grad_scale}
    for step in range(updates):
        expected = mean_of_ranks(model, world.size, step)
        # As marl train: zero in place, so from the second step on .grad are bucket views.
        local_grads(model, world.rank, step, scale=sync.grad_scale, set_to_none=False)
        out["bytes"] = sync.synchronize(list(model.parameters()))
        errors.append(grad_error(model, expected))
    out["grad_dtypes"] = sorted({str(p.grad.dtype) for p in model.parameters()})
    out["max_error"] = max(errors)
    return out


def check_train(world, cfg: DistConfig, updates: int, seed_by_rank: bool) -> dict:
    """Adam training with synced grads: identical parameters after every update; ULFM-aware."""
    sync = make_sync(world, cfg, prescaled=True)  # as marl train
    model = make_model(seed=world.rank if seed_by_rank else 0)  # ranks may differ...
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    world.broadcast_state(model, opt)  # ...until rank 0's weights are broadcast
    world.check_identical(model)
    update, metrics, errors, scales = 0, {}, [], []
    while update < updates:
        world.maybe_inject_failure(update)
        expected = mean_of_ranks(model, world.size, update)  # over the current (live) ranks
        scale = sync.grad_scale  # read per update: a recovery shrinks the world
        local_grads(model, world.rank, update, scale=scale, set_to_none=False)
        try:
            sync.synchronize(list(model.parameters()))
            metrics = world.mean_metrics({"rank": float(world.rank), "update": float(update)})
        except RankFailure:
            world.recover(model, opt)
            continue  # redo this update with the survivors
        errors.append(grad_error(model, expected))
        scales.append(scale)
        opt.step()
        update += 1
    world.check_identical(model)
    return {
        "metrics": metrics,
        "agreed": world.agree(update),
        "events": world.events,
        "checksum": float(sum(float(p.detach().double().sum()) for p in model.parameters())),
        "adam_steps": [float(s["step"]) for s in opt.state.values()],
        "size_after": world.size,
        "max_error": max(errors),
        "grad_scales": sorted(set(scales)),
    }


def check_gossip(world, cfg: DistConfig, updates: int) -> dict:
    """Parameter gossip from different starting points converges to their average (on a path
    graph of ranks, where one round of mixing is not enough)."""
    import networkx as nx

    sync = make_sync(world, cfg, topology=nx.path_graph(world.size))
    model = make_model(seed=world.rank)  # different starting points on purpose
    mean = [torch.zeros_like(p) for p in model.parameters()]
    for r in range(world.size):
        for m, p in zip(mean, make_model(seed=r).parameters()):
            m += p.detach() / world.size

    def dist() -> float:
        return max(float((p.detach() - m).abs().max()) for p, m in zip(model.parameters(), mean))

    out = {"start_distance": dist()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    trace = []
    for _ in range(updates):
        out["bytes"] = sync.synchronize(list(model.parameters()))
        trace.append(dist())
    out["distances"] = [trace[0], trace[len(trace) // 2], trace[-1]]
    return out


def check_error_feedback(world, cfg: DistConfig, updates: int) -> dict:
    """sum(sent) + residual == sum(local grads): error feedback loses nothing."""
    sync = make_sync(world, cfg)
    model = make_model()
    world.broadcast_state(model)
    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    total_grad = [torch.zeros(p.numel()) for p in params]
    comp = sync.compressor
    acc: dict[int, torch.Tensor] = {}
    bytes_total = 0
    for step in range(updates):
        for t, g in zip(total_grad, local_grads(model, world.rank, step)):
            t += g.reshape(-1)
        bytes_total += sync.synchronize(params)
        for b in sync.buckets:  # accumulate what this rank actually contributed
            acc.setdefault(b.index, torch.zeros(b.numel))
            acc[b.index] += comp.last_sent[b.index]
    errs = []
    for b in sync.buckets:
        want = torch.cat([total_grad[index[id(p)]] for p in b.params])
        got = acc[b.index] + comp.residual.get(b.index, torch.zeros(b.numel))
        errs.append(float((got - want).abs().max() / (want.abs().max() + 1e-12)))
    return {
        "relative_error": max(errs),
        "bytes": bytes_total,
        "dense_bytes": updates * sum((2 * (world.size - 1) * 4 * b.numel) // world.size for b in sync.buckets),
        "residual_norm": float(sum(float(r.norm()) for r in comp.residual.values())),
        "params_identical": _identical(world, model),
    }


def _identical(world, model) -> bool:
    from marl.distributed import RanksDivergedError

    try:
        world.check_identical(model)
        return True
    except RanksDivergedError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", required=True, choices=["suite", "train"])
    ap.add_argument("--updates", type=int, default=5)
    ap.add_argument("--fault-tolerance", default="none")
    ap.add_argument("--inject-failure", default="")
    args = ap.parse_args()
    base = DistConfig(fault_tolerance=args.fault_tolerance, inject_failure=args.inject_failure)
    try:
        world = init_world(base)
    except ConcordError as exc:  # as the CLI does: one line, exit code 2
        print(f"marl: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    out: dict = {"rank": world.rank, "size": world.size}
    if args.check == "suite":
        tiny = 0.0003  # MB: forces several buckets for the 163-parameter model
        for sync in ("allreduce", "ring", "ps"):
            out[f"mean_{sync}"] = check_mean(world, DistConfig(sync=sync, bucket_mb=tiny), 3)
        out["mean_overlap"] = check_mean(world, DistConfig(overlap=True, bucket_mb=tiny), 3)
        # Callers that do not prescale (prescaled=False) still get the mean: the averaging pass.
        out["mean_averaging"] = check_mean(world, DistConfig(bucket_mb=tiny), 3, prescaled=False)
        out["mean_overlap_averaging"] = check_mean(world, DistConfig(overlap=True, bucket_mb=tiny), 3, prescaled=False)
        # A compressor averages by itself: prescaled is ignored and grad_scale stays 1.
        out["mean_fp16"] = check_mean(world, DistConfig(compress="fp16"), 2)
        out["mean_bf16"] = check_mean(world, DistConfig(), 2, dtype=torch.bfloat16)
        out["gossip"] = check_gossip(world, DistConfig(sync="gossip"), 40)
        for comp in ("topk:0.05", "powersgd:1"):
            out[f"ef_{comp}"] = check_error_feedback(world, DistConfig(compress=comp), 8)
        out["train"] = check_train(world, DistConfig(), args.updates, seed_by_rank=True)
    else:
        out["train"] = check_train(world, base, args.updates, seed_by_rank=False)
    world.close()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
