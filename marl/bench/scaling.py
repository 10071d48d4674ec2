"""``marl bench scaling``: data-parallel throughput, allreduce cost and gradient compression.

1. Training samples/s (environment steps per second, summed over ranks) of ``marl train`` on a
   small SUMO scenario at 1, 2, 4 and 8 ranks, as ratios to 1 rank (target 1 -> 2 ranks >= 1.6x
   on 2 free cores; a shared machine gives less). Past the machine's cores the job is
   oversubscribed (``mpiexec --oversubscribe``, added by :mod:`marl.distributed.launch`), so
   samples/s stop growing: the ranks share the cores. Per update it also reports the gradient
   bytes each rank put on the wire (the ``train_grad_sync_bytes`` records) and the **allreduce
   time per update**: a separate MPI job with the same rank count times an in-place
   ``Allreduce(SUM)`` of the run's gradient size (the slowest rank's mean, best of repeats) and
   multiplies by the syncs per update (``update_epochs`` x ``num_minibatches``).
2. A paper estimate for 64 ranks over 10 GbE from the measured gradient size and the
   ring-allreduce cost model ``2 (p-1)/p * bytes / bandwidth + 2 (p-1) * latency`` per sync
   (Thakur, Rabenseifner & Gropp 2005; Patarasuk & Yuan 2009), against the measured seconds of
   one update at 1 rank.
3. Each compressor vs none on the same task and seed with 2 ranks: gradient bytes each rank put
   on the wire and the final evaluation return (target for ``topk:0.01`` with error feedback:
   >= 50x fewer bytes, >= 95% of the uncompressed return). ``--skip-compress`` leaves it out.

Every training run is a real ``marl train`` job (subprocess, mpiexec launched by ``--ranks``).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import click

__all__ = ["command", "ring_allreduce_seconds"]


def _train(
    out: Path, scenario: str, ranks: int, steps: int, num_steps: int, seed: int, extra: list[str], eval_episodes: int
) -> dict:
    marl = str(Path(sys.executable).parent / "marl")  # this venv's, whatever PATH says
    cmd = [
        marl,
        "train",
        scenario,
        "--test",
        "--ranks",
        str(ranks),
        "--steps",
        str(steps),
        "--seed",
        str(seed),
        "--algo-set",
        f"num_steps={num_steps}",
        "--eval-episodes",
        str(eval_episodes),
        "--out",
        str(out),
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise click.ClickException(f"{' '.join(cmd[1:])} failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    (manifest,) = [json.loads(p.read_text()) for p in (out / "manifests").glob("*.json")]
    rows = list(csv.DictReader((out / "records.csv").open()))
    per_update = [float(r["value"]) for r in rows if r["metric"] == "train_grad_sync_bytes"]
    sync_bytes = sum(per_update)
    eval_returns = [float(r["value"]) for r in rows if r["metric"] == "return"]
    train_returns = [float(r["value"]) for r in rows if r["metric"] == "train_return"]
    return {
        "samples_per_second": manifest["env_steps"] / manifest["train_seconds"],
        "env_steps": manifest["env_steps"],
        "bytes": sync_bytes,
        "bytes_per_update": sync_bytes / len(per_update) if per_update else 0.0,
        "updates": manifest.get("updates_completed", len(per_update)),
        "train_seconds": manifest["train_seconds"],
        "eval_return": sum(eval_returns) / len(eval_returns) if eval_returns else float("nan"),
        "train_return_last": sum(train_returns[-3:]) / len(train_returns[-3:]) if train_returns else float("nan"),
    }


#: 10 GbE for the paper estimate: bytes/s and a per-message latency (TCP over 10 GbE, MPI).
GBE10_BYTES_PER_S = 10e9 / 8
GBE10_LATENCY_S = 25e-6


def ring_allreduce_seconds(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """Ring-allreduce cost model: ``2 (p-1)/p * bytes / bandwidth + 2 (p-1) * latency`` seconds
    for ``nbytes`` of gradient on ``ranks`` ranks (reduce-scatter then all-gather, 2 (p-1) steps)."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / bandwidth + 2 * (ranks - 1) * latency


def _allreduce_job(args: dict) -> None:
    """On every rank: time an in-place fp32 Allreduce(SUM) of ``args['bytes']`` (best of repeats
    of the slowest rank's mean, as ``marl bench allreduce`` does); the root prints the seconds."""
    import numpy as np
    import torch

    from marl.bench.allreduce import _timed
    from marl.distributed import DistConfig, init_world
    from marl.distributed.world import MPIWorld

    torch.set_num_threads(1)
    world = init_world(DistConfig())
    assert isinstance(world, MPIWorld), "runs under mpiexec with >= 2 ranks"
    MPI = world.MPI
    buf = np.random.default_rng(0).standard_normal(max(1, int(args["bytes"]) // 4)).astype(np.float32)

    def raw() -> None:
        world.comm.Allreduce(MPI.IN_PLACE, [buf, MPI.FLOAT], op=MPI.SUM)

    seconds = _timed(world, raw, repeat=int(args.get("repeat", 5)), inner=int(args.get("inner", 50)))
    world.close()
    if world.is_root:
        print("BENCH " + json.dumps({"seconds": seconds}), flush=True)


def _time_allreduce(ranks: int, nbytes: float) -> float:
    """Seconds of one in-place Allreduce of ``nbytes`` on ``ranks`` ranks (0 for one rank)."""
    if ranks <= 1:
        return 0.0
    from marl.distributed.launch import run_under_mpiexec

    args = json.dumps({"bytes": nbytes})
    proc = run_under_mpiexec(ranks, [sys.executable, "-m", "marl.bench.scaling", args], timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        raise click.ClickException(
            f"allreduce job on {ranks} ranks failed (exit {proc.returncode}): {proc.stderr[-1500:]}"
        )
    return float(json.loads(lines[-1][6:])["seconds"])


@click.command("scaling")
@click.option("--scenario", default="traffic/2x2grid", help="Scenario trained (its --test preset is used).")
@click.option("--ranks", "rank_list", default="1,2,4,8", help="Comma-separated rank counts for the throughput part.")
@click.option("--steps-per-rank", type=int, default=1024, help="Environment steps per rank in the throughput part.")
@click.option("--compress-steps", type=int, default=8192, help="Total environment steps of each compression run.")
@click.option("--compressors", default="fp16,topk:0.01,powersgd:2", help="Compressors compared against none.")
@click.option("--skip-compress", is_flag=True, help="Leave out the compression part.")
@click.option("--estimate-ranks", type=int, default=64, help="Rank count of the 10 GbE paper estimate.")
@click.option("--seed", type=int, default=0, help="Seed of every run.")
def command(
    scenario: str,
    rank_list: str,
    steps_per_rank: int,
    compress_steps: int,
    compressors: str,
    skip_compress: bool,
    estimate_ranks: int,
    seed: int,
) -> None:
    """Samples/s and allreduce time per update at 1, 2, 4, 8 ranks (oversubscribed past the
    cores); a 64-rank 10 GbE estimate; bytes and final return of each compressor vs none."""
    import os

    from rich.console import Console
    from rich.table import Table

    from marl.algos.ippo import IPPOConfig
    from marl.cli import app
    from marl.core.errors import ConfigError
    from marl.distributed import DistConfig

    if "train" not in app.commands:
        raise ConfigError("'marl bench scaling' needs 'marl train', which is not in this build")
    try:
        ranks = [int(r) for r in rank_list.split(",") if r.strip()]
    except ValueError:
        ranks = []
    if not ranks or min(ranks) < 1:
        raise ConfigError(f"bad value for --ranks: '{rank_list}'; expected e.g. 1,2,4,8")
    if estimate_ranks < 2:
        raise ConfigError(f"bad value for --estimate-ranks: {estimate_ranks}; expected an integer >= 2")
    comps = [c.strip() for c in compressors.split(",") if c.strip()]
    for c in comps:
        DistConfig(compress=c)  # validates the names before anything runs
    # Piped output (files, CI logs) gets a wide console instead of rich's 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 160)
    num_steps = 128
    algo = IPPOConfig(num_steps=num_steps)
    syncs = algo.update_epochs * algo.num_minibatches  # gradient syncs per update
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        scale = {}
        for n in ranks:
            with console.status(f"marl train {scenario} --ranks {n} ..."):
                scale[n] = _train(Path(tmp) / f"scale{n}", scenario, n, steps_per_rank * n, num_steps, seed, [], 0)
            # Gradient bytes per sync, from the wire bytes of a ring allreduce (2 (p-1)/p of it).
            wire = scale[n]["bytes_per_update"] / syncs
            scale[n]["grad_bytes"] = wire * n / (2 * (n - 1)) if n > 1 else float("nan")
        grad_bytes = next((scale[n]["grad_bytes"] for n in ranks if n > 1), float("nan"))
        for n in ranks:
            with console.status(f"Allreduce of {grad_bytes:.0f} B on {n} ranks ..."):
                scale[n]["allreduce_s"] = syncs * _time_allreduce(n, grad_bytes) if n > 1 else 0.0
        t = Table(title=f"data-parallel throughput, {scenario} ({cores} cores)", header_style="bold")
        for col in ("ranks", "samples/s", "vs 1 rank", "s per update", "wire bytes/update/rank", "allreduce ms/update"):
            t.add_column(col, justify="right")
        base = scale[ranks[0]]["samples_per_second"]
        for n in ranks:
            r = scale[n]
            t.add_row(
                f"{n}{' (oversubscribed)' if n > cores else ''}",
                f"{r['samples_per_second']:.0f}",
                f"{r['samples_per_second'] / base:.2f}x",
                f"{r['train_seconds'] / max(r['updates'], 1):.2f}",
                f"{r['bytes_per_update']:.3g}",
                f"{1e3 * r['allreduce_s']:.2f}",
            )
        console.print(t)
        one = scale.get(1)
        if grad_bytes == grad_bytes:  # measured at > 1 rank
            p = estimate_ranks
            per_sync = ring_allreduce_seconds(grad_bytes, p, GBE10_BYTES_PER_S, GBE10_LATENCY_S)
            update_s = one["train_seconds"] / max(one["updates"], 1) if one else float("nan")
            console.print(
                f"paper estimate, {p} ranks over 10 GbE ({GBE10_BYTES_PER_S / 1e9:.2f} GB/s, "
                f"{GBE10_LATENCY_S * 1e6:.0f} us per message): gradient {grad_bytes:.0f} B per sync, {syncs} syncs "
                f"per update -> {1e3 * syncs * per_sync:.2f} ms of allreduce per update "
                f"({1e3 * syncs * 2 * (p - 1) * GBE10_LATENCY_S:.2f} ms of it latency), vs {update_s:.2f} s of "
                f"rollout + update per update at 1 rank ({100 * syncs * per_sync / update_s:.2f}% overhead)"
            )
        if skip_compress:
            return

        runs = {}
        for c in ["none", *comps]:
            with console.status(f"marl train {scenario} --ranks 2 --compress {c} ..."):
                runs[c] = _train(
                    Path(tmp) / f"c{c.replace(':', '_')}",
                    scenario,
                    2,
                    compress_steps,
                    num_steps,
                    seed,
                    ["--compress", c],
                    2,
                )
        t = Table(title=f"gradient compression, 2 ranks, {compress_steps} steps, seed {seed}", header_style="bold")
        for col in ("compress", "bytes/rank", "fewer bytes", "eval return", "% of none", "train return (last 3)"):
            t.add_column(col, justify="right")
        ref = runs["none"]
        for c, r in runs.items():
            pct = 100 * r["eval_return"] / ref["eval_return"] if ref["eval_return"] else float("nan")
            # Returns are negative in traffic (waiting time): compare as "how close to none".
            if ref["eval_return"] < 0:
                pct = 100 * ref["eval_return"] / r["eval_return"] if r["eval_return"] else float("nan")
            t.add_row(
                c,
                f"{r['bytes']:.3g}",
                f"{ref['bytes'] / r['bytes']:.1f}x" if r["bytes"] else "-",
                f"{r['eval_return']:.3f}",
                f"{pct:.0f}%",
                f"{r['train_return_last']:.3f}",
            )
        console.print(t)
        console.print(
            "targets: 1->2 ranks >= 1.6x; topk:0.01 >= 50x fewer bytes and >= 95% of none's return "
            "(single seed: returns are indicative only)"
        )


if __name__ == "__main__":
    _allreduce_job(json.loads(sys.argv[1]))
