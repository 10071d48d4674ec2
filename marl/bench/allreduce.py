"""``marl bench allreduce``: cost of Concord's gradient sync against raw MPI, on real ranks.

Starts its own ``mpiexec -n RANKS`` job and prints ratios measured within that one job:

1. fused bucket sync as ``marl train`` runs it (``make_sync(..., prescaled=True)``: the loss was
   scaled by ``grad_scale`` = 1/ranks, ``.grad`` are views into the buckets, so a sync is one
   in-place ``Allreduce(SUM)`` per bucket) vs a raw ``Allreduce(IN_PLACE)`` of the same bytes,
   1 KB .. 64 MB (target <= 1.10x at >= 1 MB); also with fresh gradient tensors (packing copies)
   and with the averaging pass of a caller that does not prescale. At 64 MB the sync issues one
   Allreduce per 16 MB bucket (``bucket_mb`` 25), the raw reference a single 64 MB call;
2. fused vs one Allreduce per parameter tensor for the policy networks we train: a PPO
   actor-critic MLP and a many-small-tensors network (target >= 3x faster);
3. ring (ours, Sendrecv), parameter server and gossip vs the default fused allreduce.

Each time is the minimum over repeats of the slowest rank's mean; measurements run in rounds,
back to back, and ratios are medians of per-round ratios (robust to a shared machine's load).
"""

from __future__ import annotations

import json
import sys

import click

__all__ = ["command"]

SIZES = [1 << 10, 16 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]


@click.command("allreduce")
@click.option("--ranks", type=int, default=2, help="MPI ranks of the benchmark job.")
@click.option("--max-mb", type=float, default=64.0, help="Largest message size, MB.")
@click.option("--repeat", type=int, default=3, help="Timed repeats per measurement (minimum is kept).")
def command(ranks: int, max_mb: float, repeat: int) -> None:
    """Fused gradient sync vs raw Allreduce and per-tensor Allreduce; ring, ps and gossip."""
    from rich.console import Console
    from rich.table import Table

    from marl.core.errors import ConfigError
    from marl.distributed.launch import run_under_mpiexec

    if ranks < 2:
        raise ConfigError(f"bad value for --ranks: {ranks}; the benchmark needs >= 2 ranks")
    console = Console()
    args = json.dumps({"max_bytes": int(max_mb * (1 << 20)), "repeat": repeat})
    with console.status(f"running {ranks} MPI ranks..."):
        proc = run_under_mpiexec(
            ranks, [sys.executable, "-m", "marl.bench.allreduce", args], timeout=1800, shared_node=False
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        raise click.ClickException(f"benchmark job failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    res = json.loads(lines[-1][6:])

    t = Table(title=f"fused sync vs raw Allreduce ({ranks} ranks)", header_style="bold")
    for col in ("bytes", "raw ms", "fused ms", "fused/raw", "fresh grads/raw", "with averaging pass/raw"):
        t.add_column(col, justify="right")
    for row in res["sizes"]:
        t.add_row(
            _fmt_bytes(row["bytes"]),
            f"{row['raw'] * 1e3:.3f}",
            f"{row['fused'] * 1e3:.3f}",
            f"{row['ratio']:.2f}x",
            f"{row['ratio_fresh']:.2f}x",
            f"{row['ratio_averaging']:.2f}x",
        )
    console.print(t)
    big = [r for r in res["sizes"] if r["bytes"] >= 1 << 20]
    if big:
        console.print(
            f"fused/raw at >= 1 MB (median of per-round ratios): worst {max(r['ratio'] for r in big):.2f}x "
            f"as marl train syncs (prescaled loss, grads in place; target <= 1.10x), "
            f"{max(r['ratio_fresh'] for r in big):.2f}x with fresh grads, "
            f"{max(r['ratio_averaging'] for r in big):.2f}x with the averaging pass"
        )

    t = Table(title="fused vs one Allreduce per tensor", header_style="bold")
    for col in (
        "network",
        "tensors",
        "bytes",
        "per-tensor ms",
        "fused ms",
        "speed-up",
        "fused, grads in place ms",
        "speed-up (in place)",
    ):
        t.add_column(col, justify="right")
    for name, row in res["nets"].items():
        t.add_row(
            name,
            str(row["tensors"]),
            _fmt_bytes(row["bytes"]),
            f"{row['per_tensor'] * 1e3:.3f}",
            f"{row['fused'] * 1e3:.3f}",
            f"{row['speedup']:.1f}x",
            f"{row['fused_inplace'] * 1e3:.3f}",
            f"{row['speedup_inplace']:.1f}x",
        )
    console.print(t)
    console.print(
        "target: fused >= 3x faster than per-tensor; 'in place' is what marl train does "
        "(zero_grad(set_to_none=False) keeps .grad as views into the buckets; loss prescaled)"
    )

    t = Table(title="sync methods vs default fused allreduce", header_style="bold")
    for col in ("payload", "method", "ms", "vs allreduce", "bytes sent/rank"):
        t.add_column(col, justify="right")
    for payload, methods in res["methods"].items():
        base = methods["allreduce"]["time"]
        for name, row in methods.items():
            t.add_row(payload, name, f"{row['time'] * 1e3:.3f}", f"{row['time'] / base:.2f}x", _fmt_bytes(row["bytes"]))
    console.print(t)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# -- the job (runs on every rank) ------------------------------------------------------------------


def _timed(world, fn, repeat: int, inner: int) -> float:
    """Minimum over ``repeat`` of the slowest rank's mean time of ``inner`` calls to fn."""
    import time

    import numpy as np

    MPI = world.MPI
    fn()  # warm up (connections, bucket layout)
    best = float("inf")
    for _ in range(repeat):
        world.comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        dt = np.array([(time.perf_counter() - t0) / inner])
        world.comm.Allreduce(MPI.IN_PLACE, [dt, MPI.DOUBLE], op=MPI.MAX)
        best = min(best, float(dt[0]))
    return best


def _ppo_mlp(obs: int = 64, hidden: int = 64, actions: int = 8):
    """The IPPO actor-critic shape: two 2-hidden-layer tanh MLPs (CleanRL ppo.py)."""
    import torch.nn as nn

    def mlp(out: int) -> nn.Module:
        return nn.Sequential(
            nn.Linear(obs, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, out)
        )

    return nn.ModuleDict({"actor": mlp(actions), "critic": mlp(1)})


def _many_small(layers: int = 100, width: int = 16):
    import torch.nn as nn

    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def _job(max_bytes: int, repeat: int, rounds: int = 5) -> None:
    import numpy as np
    import torch

    from marl.distributed import DistConfig, init_world, make_sync
    from marl.distributed.sync import AllreduceSync
    from marl.distributed.world import MPIWorld

    torch.set_num_threads(1)
    world = init_world(DistConfig())
    assert isinstance(world, MPIWorld), "the allreduce bench runs under mpiexec with >= 2 ranks"
    MPI = world.MPI
    cfg = DistConfig()

    def tensors_of(nbytes: int) -> list[torch.nn.Parameter]:
        n = max(1, nbytes // 4)
        parts = [n // 4] * 3 + [n - 3 * (n // 4)] if n >= 4 else [n]
        return [torch.nn.Parameter(torch.zeros(k)) for k in parts if k > 0]

    def inner_for(nbytes: int) -> int:
        return max(2, min(200, (8 << 20) // max(nbytes, 1)))

    sizes = []
    for nbytes in [s for s in SIZES if s <= max_bytes]:
        inner = inner_for(nbytes)
        raw_buf = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)

        def raw() -> None:
            world.comm.Allreduce(MPI.IN_PLACE, [raw_buf, MPI.FLOAT], op=MPI.SUM)

        params = tensors_of(nbytes)
        sync_fresh = AllreduceSync(world, cfg, prescaled=True)
        fresh = [torch.randn_like(p) for p in params]

        def fused_fresh() -> None:  # grads are separate tensors: packing copies them into the bucket
            for p, g in zip(params, fresh):
                p.grad = g
            sync_fresh.synchronize(params)

        def in_place(prescaled: bool):
            """A sync whose .grad are already views into its buckets, as in marl train."""
            ps = tensors_of(nbytes)
            sync = AllreduceSync(world, cfg, prescaled=prescaled)
            for p in ps:
                p.grad = torch.randn_like(p)
            sync.synchronize(ps)  # afterwards .grad are views into the bucket
            return lambda: sync.synchronize(ps)

        # What marl train does: loss scaled by grad_scale, so the sync is the Allreduce alone.
        fused = in_place(prescaled=True)
        averaging = in_place(prescaled=False)  # a caller that does not prescale: + averaging pass

        # Rounds of back-to-back measurements; the median of per-round ratios is robust to the
        # load of a shared machine drifting between rounds.
        t_raw, t_fused, t_fresh, t_avg = [], [], [], []
        for _ in range(rounds):
            t_raw.append(_timed(world, raw, repeat, inner))
            t_fused.append(_timed(world, fused, repeat, inner))
            t_fresh.append(_timed(world, fused_fresh, repeat, inner))
            t_avg.append(_timed(world, averaging, repeat, inner))
        ratio = lambda ts: float(np.median(np.array(ts) / np.array(t_raw)))
        sizes.append(
            {
                "bytes": nbytes,
                "raw": float(np.median(t_raw)),
                "fused": float(np.median(t_fused)),
                "fresh": float(np.median(t_fresh)),
                "averaging": float(np.median(t_avg)),
                "ratio": ratio(t_fused),
                "ratio_fresh": ratio(t_fresh),
                "ratio_averaging": ratio(t_avg),
            }
        )

    nets = {}
    for name, net in (("ppo-mlp", _ppo_mlp()), ("many-small", _many_small())):
        params = list(net.parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        grads = [g for p in params if (g := p.grad) is not None]
        sync = AllreduceSync(world, cfg, prescaled=True)

        def fused() -> None:
            for p, g in zip(params, grads):
                p.grad = g
            sync.synchronize(params)

        def per_tensor() -> None:
            for g in grads:
                world.comm.Allreduce(MPI.IN_PLACE, [g.numpy(), MPI.FLOAT], op=MPI.SUM)
                g /= world.size

        # As in marl train (zero_grad(set_to_none=False)): after one sync every .grad is a view
        # into its bucket, so backward writes straight into the fused buffer.
        params_in = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p in params_in:
            p.grad = torch.randn_like(p)
        sync_in = AllreduceSync(world, cfg, prescaled=True)
        sync_in.synchronize(params_in)

        def fused_inplace() -> None:
            sync_in.synchronize(params_in)

        t_f, t_p, t_i = [], [], []
        for _ in range(rounds):
            t_p.append(_timed(world, per_tensor, repeat, 50))
            t_f.append(_timed(world, fused, repeat, 50))
            t_i.append(_timed(world, fused_inplace, repeat, 50))
        nets[name] = {
            "tensors": len(params),
            "bytes": sum(p.numel() * 4 for p in params),
            "fused": float(np.median(t_f)),
            "per_tensor": float(np.median(t_p)),
            "fused_inplace": float(np.median(t_i)),
            "speedup": float(np.median(np.array(t_p) / np.array(t_f))),
            "speedup_inplace": float(np.median(np.array(t_p) / np.array(t_i))),
        }

    methods: dict[str, dict] = {}
    payloads = {"ppo-mlp": list(_ppo_mlp().parameters()), "4 MB": tensors_of(4 << 20)}
    for label, params in payloads.items():
        grads = [torch.randn_like(p) for p in params]
        methods[label] = {}
        for method in ("allreduce", "ring", "ps", "gossip"):
            any_sync = make_sync(world, DistConfig(sync=method), prescaled=True)  # as marl train

            def step() -> None:
                for p, g in zip(params, grads):
                    p.grad = g
                any_sync.synchronize(params)

            inner = 50 if label == "ppo-mlp" else 5
            t = min(_timed(world, step, repeat, inner) for _ in range(2))
            sent = np.array([any_sync.last_bytes], dtype=np.float64)
            world.comm.Allreduce(MPI.IN_PLACE, [sent, MPI.DOUBLE], op=MPI.MAX)
            methods[label][method] = {"time": t, "bytes": float(sent[0])}

    world.close()
    if world.is_root:
        print("BENCH " + json.dumps({"sizes": sizes, "nets": nets, "methods": methods}), flush=True)


if __name__ == "__main__":
    _opts = json.loads(sys.argv[1])
    _job(_opts["max_bytes"], _opts["repeat"])
