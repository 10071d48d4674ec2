"""``marl bench recovery``: what a dead rank costs, with ULFM and with checkpoints.

1. ULFM (real ranks, ``mpiexec --with-ft ulfm``): a PPO-sized actor-critic trains with Adam on
   RANKS ranks; rank 1 SIGKILLs itself at update 5. Reported: time from its death to detection
   by the survivors, from detection to resumed training (target < 1 s), and whether the survivors'
   parameters are bit-identical afterwards (checksum allreduce).
2. Checkpoints (``marl train --fault-tolerance checkpoint``, when that command exists): a rank
   is killed, the whole job dies, ``--resume`` continues from ``latest.json``. Reported: updates
   and seconds of work lost (at most one checkpoint interval).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import click

__all__ = ["command"]


@click.command("recovery")
@click.option("--ranks", type=int, default=4, help="MPI ranks (>= 3, so that >= 2 survivors can be compared).")
@click.option("--updates", type=int, default=12, help="Updates of the ULFM training job.")
@click.option("--kill-at", type=int, default=5, help="Update at which rank 1 kills itself.")
@click.option("--checkpoint/--no-checkpoint", default=True, help="Also measure checkpoint + --resume via marl train.")
def command(ranks: int, updates: int, kill_at: int, checkpoint: bool) -> None:
    """Time to resume after a rank's death (ULFM) and work lost with checkpoints."""
    from rich.console import Console
    from rich.table import Table

    from marl.core.errors import ConfigError
    from marl.distributed.launch import run_under_mpiexec, ulfm_problem

    if ranks < 3:
        raise ConfigError(f"bad value for --ranks: {ranks}; allowed: >= 3 (two survivors to compare)")
    if not 0 < kill_at < updates:
        raise ConfigError(f"bad value for --kill-at: {kill_at}; allowed: 1..{updates - 1}")
    console = Console()
    problem = ulfm_problem()
    if problem is not None:
        raise ConfigError(f"ULFM is unsupported here: {problem}")
    with tempfile.TemporaryDirectory() as tmp:
        death_file = Path(tmp) / "death.json"
        args = json.dumps({"updates": updates, "kill_at": kill_at, "death_file": str(death_file)})
        with console.status(f"ULFM job on {ranks} ranks..."):
            proc = run_under_mpiexec(ranks, [sys.executable, "-m", "marl.bench.recovery", args], ulfm=True, timeout=600)
        lines = [json.loads(ln[6:]) for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
        if proc.returncode != 0 or not lines or not death_file.exists():
            raise click.ClickException(
                f"ULFM job failed (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}"
            )
        death = json.loads(death_file.read_text())["time"]
    t = Table(title=f"ULFM: rank 1 killed at update {kill_at} of {updates} ({ranks} ranks)", header_style="bold")
    for col in (
        "survivor",
        "death->detect s",
        "detect->resumed s",
        "death->resumed s",
        "work lost s",
        "world after",
        "checksum",
    ):
        t.add_column(col, justify="right")
    for r in sorted(lines, key=lambda x: x["rank"]):
        t.add_row(
            str(r["rank"]),
            f"{r['detected'] - death:.3f}",
            f"{r['resumed'] - r['detected']:.3f}",
            f"{r['resumed'] - death:.3f}",
            f"{r['event']['seconds_lost']:.3f}",
            str(r["event"]["world_size_after"]),
            r["checksum"],
        )
    console.print(t)
    worst = max(r["resumed"] - r["detected"] for r in lines)
    same = len({r["checksum"] for r in lines}) == 1 and all(r["identical"] for r in lines)
    console.print(
        f"detection -> resumed training: worst {worst:.3f} s (target < 1 s); "
        f"survivors' parameters identical: {'yes' if same else 'NO'}"
    )
    if checkpoint:
        _checkpoint_part(console)


def _checkpoint_part(console) -> None:
    """Kill a rank under `marl train --fault-tolerance checkpoint`, then --resume."""
    import subprocess

    from rich.table import Table

    marl = str(Path(sys.executable).parent / "marl")
    if not Path(marl).exists():
        console.print("checkpoint part skipped: the 'marl' script is not installed")
        return
    from marl.cli import app

    if "train" not in app.commands:
        console.print("checkpoint part skipped: 'marl train' does not exist in this build")
        return
    every, kill_at = 2, 5
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        base = [
            marl,
            "train",
            "traffic/2x2grid",
            "--test",
            "--ranks",
            "2",
            "--eval-episodes",
            "0",
            "--algo-set",
            "num_steps=64",
            "--algo-set",
            f"checkpoint_every={every}",
            "--out",
            str(out),
        ]
        with console.status("checkpoint run (a rank will be killed)..."):
            t0 = time.time()
            first = subprocess.run(
                [
                    *base,
                    "--steps",
                    str(64 * 2 * 8),
                    "--fault-tolerance",
                    "checkpoint",
                    "--inject-failure",
                    f"1:{kill_at}",
                ],
                capture_output=True,
                text=True,
                timeout=900,
            )
            died = time.time()
        latest = out / "checkpoints" / "latest.json"
        if first.returncode == 0 or not latest.exists():
            console.print(
                f"checkpoint part failed: exit {first.returncode}, latest.json exists: {latest.exists()}: "
                f"{first.stderr[-1500:]}",
                markup=False,
            )
            return
        info = json.loads(latest.read_text())
        ckpt_time = (out / "checkpoints" / info["file"]).stat().st_mtime
        with console.status("resuming..."):
            second = subprocess.run(
                [*base, "--steps", str(64 * 2 * 8), "--resume", str(out)], capture_output=True, text=True, timeout=900
            )
        t = Table(title=f"checkpoints every {every} updates; rank 1 killed at update {kill_at}", header_style="bold")
        for col in (
            "job exit code",
            "last checkpoint",
            "updates lost",
            "seconds lost (ckpt -> death)",
            "resume exit code",
        ):
            t.add_column(col, justify="right")
        t.add_row(
            str(first.returncode),
            f"update {info['update']}",
            str(kill_at - int(info["update"])),
            f"{died - ckpt_time:.1f}",
            str(second.returncode),
        )
        console.print(t)
        console.print(
            f"(whole first run took {died - t0:.0f} s; updates lost <= interval {every}: "
            f"{'yes' if kill_at - int(info['update']) <= every else 'NO'})"
        )


# -- the ULFM job (runs on every rank) --------------------------------------------------------------


def _job(updates: int, kill_at: int, death_file: str) -> None:
    import hashlib

    import torch

    from marl.distributed import DistConfig, RankFailure, RanksDivergedError, init_world, make_sync

    torch.set_num_threads(1)
    cfg = DistConfig(fault_tolerance="ulfm", inject_failure=f"1:{kill_at}")
    world = init_world(cfg)
    torch.manual_seed(0)
    from marl.bench.allreduce import _ppo_mlp

    model = _ppo_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    sync = make_sync(world, cfg)
    world.broadcast_state(model, opt)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(world.rank)
    update, detected, resumed = 0, None, None
    while update < updates:
        if world.original_rank == 1 and update == kill_at:
            Path(death_file).write_text(json.dumps({"time": time.time()}))
        world.maybe_inject_failure(update)
        x = torch.randn(512, 64, generator=gen)
        loss = model["actor"](x).pow(2).mean() + model["critic"](x).pow(2).mean()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        try:
            sync.synchronize(params)
            world.mean_metrics({"loss": float(loss)})
        except RankFailure:
            detected = time.time()
            world.recover(model, opt)
            resumed = time.time()
            continue
        opt.step()
        update += 1
    try:
        world.check_identical(model)
        identical = True
    except RanksDivergedError:
        identical = False
    digest = hashlib.blake2b(b"".join(p.detach().numpy().tobytes() for p in params), digest_size=6).hexdigest()
    event = world.events[0] if world.events else {}
    world.close()
    if detected is not None:
        print(
            "BENCH "
            + json.dumps(
                {
                    "rank": world.original_rank,
                    "detected": detected,
                    "resumed": resumed,
                    "event": event,
                    "checksum": digest,
                    "identical": identical,
                }
            ),
            flush=True,
        )
    sys.stdout.flush()


if __name__ == "__main__":
    _opts = json.loads(sys.argv[1])
    _job(_opts["updates"], _opts["kill_at"], _opts["death_file"])
