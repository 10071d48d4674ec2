"""``marl bench scaling``: data-parallel throughput and gradient compression, via ``marl train``.

1. Training samples/s (environment steps per second, summed over ranks) of ``marl train`` on a
   small SUMO scenario at 1, 2 and 4 ranks, as ratios to 1 rank (target 1 -> 2 ranks >= 1.6x on
   2 free cores; a shared machine gives less).
2. Each compressor vs none on the same task and seed with 2 ranks: gradient bytes each rank put
   on the wire (the ``train_grad_sync_bytes`` records) and the final evaluation return (target
   for ``topk:0.01`` with error feedback: >= 50x fewer bytes, >= 95% of the uncompressed return).

Every run is a real ``marl train`` job (subprocess, mpiexec launched by ``--ranks``).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import click

__all__ = ["command"]


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
    sync_bytes = sum(float(r["value"]) for r in rows if r["metric"] == "train_grad_sync_bytes")
    eval_returns = [float(r["value"]) for r in rows if r["metric"] == "return"]
    train_returns = [float(r["value"]) for r in rows if r["metric"] == "train_return"]
    return {
        "samples_per_second": manifest["env_steps"] / manifest["train_seconds"],
        "env_steps": manifest["env_steps"],
        "bytes": sync_bytes,
        "eval_return": sum(eval_returns) / len(eval_returns) if eval_returns else float("nan"),
        "train_return_last": sum(train_returns[-3:]) / len(train_returns[-3:]) if train_returns else float("nan"),
    }


@click.command("scaling")
@click.option("--scenario", default="traffic/2x2grid", help="Scenario trained (its --test preset is used).")
@click.option("--ranks", "rank_list", default="1,2,4", help="Comma-separated rank counts for the throughput part.")
@click.option("--steps-per-rank", type=int, default=1024, help="Environment steps per rank in the throughput part.")
@click.option("--compress-steps", type=int, default=8192, help="Total environment steps of each compression run.")
@click.option("--compressors", default="fp16,topk:0.01,powersgd:2", help="Compressors compared against none.")
@click.option("--seed", type=int, default=0, help="Seed of every run.")
def command(
    scenario: str, rank_list: str, steps_per_rank: int, compress_steps: int, compressors: str, seed: int
) -> None:
    """Samples/s at 1, 2, 4 ranks; bytes and final return of each compressor vs none."""
    from rich.console import Console
    from rich.table import Table

    from marl.cli import app
    from marl.core.errors import ConfigError
    from marl.distributed import DistConfig

    if "train" not in app.commands:
        raise ConfigError("'marl bench scaling' needs 'marl train', which is not in this build")
    ranks = [int(r) for r in rank_list.split(",") if r.strip()]
    if not ranks or min(ranks) < 1:
        raise ConfigError(f"bad value for --ranks: '{rank_list}'; expected e.g. 1,2,4")
    comps = [c.strip() for c in compressors.split(",") if c.strip()]
    for c in comps:
        DistConfig(compress=c)  # validates the names before anything runs
    console = Console()
    num_steps = 128
    with tempfile.TemporaryDirectory() as tmp:
        scale = {}
        for n in ranks:
            with console.status(f"marl train {scenario} --ranks {n} ..."):
                scale[n] = _train(Path(tmp) / f"scale{n}", scenario, n, steps_per_rank * n, num_steps, seed, [], 0)
        t = Table(title=f"data-parallel throughput, {scenario}", header_style="bold")
        for col in ("ranks", "samples/s", "vs 1 rank"):
            t.add_column(col, justify="right")
        base = scale[ranks[0]]["samples_per_second"]
        for n in ranks:
            t.add_row(str(n), f"{scale[n]['samples_per_second']:.0f}", f"{scale[n]['samples_per_second'] / base:.2f}x")
        console.print(t)

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
