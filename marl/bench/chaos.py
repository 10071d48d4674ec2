"""``marl bench chaos``: kill a random rank of a real training job from outside, and check it lives.

Three modes (``--mode``, default all three), each a ``marl train traffic/2x2grid --ranks R
--fault-tolerance ulfm`` job (short test episodes) with:

* ``ulfm``: allreduce; the survivors shrink and train on with R - 1 ranks;
* ``respawn``: allreduce with ``--respawn``; the survivors spawn a replacement, the world is R again;
* ``gossip``: ``--sync gossip``, root-free push-sum averaging; the survivors drop the dead peer.

Each trial waits until the job has logged a random update of its first half, waits a random
moment into the next update (rollout, backward, allreduce or checkpoint), then SIGKILLs one rank
process chosen at random (rank 0 included), found among the job's processes by
its ``OMPI_COMM_WORLD_RANK``. Reported per trial:

* whether the job exited 0, and its final update count;
* whether the records are complete (one run id; every update ``1..updates_completed`` once; a
  ``rank_failure_<r>`` row and manifest event for the killed rank; the final evaluation) and free of
  duplicate keys;
* the recovery time the survivors measured (detection to resumed training) and the work the
  failure threw away (the interrupted update, in seconds), from the manifest's event;
* updates lost: allreduce redoes the interrupted update once (1 per failure); gossip loses no
  update but the writing rank may skip averaging rounds (``gossip_rounds_skipped``);
* the time from the kill to the next update logged in the records, measured from outside (the
  bench polls the records every 50 ms);
* allreduce modes: how often the ranks' parameters were checked bit-identical (at every
  checkpoint, and when a replacement joins; a difference fails the job);
* respawn: whether the world was back to R (a ``rank_rejoin`` event) and how long after the
  failure.

``--kills 2`` kills a second rank (another random survivor) later in the same trial (ulfm and
gossip; a replacement is not found by its launch rank, so respawn mode kills once). The trials
run one after the other, so each job has the machine to itself.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click

__all__ = ["command", "find_rank_pid", "check_records"]

#: Most trials one command may ask for: each is a multi-process MPI job of about half a minute.
MAX_TRIALS = 100
#: Modes and the ``marl train`` options each adds to the ULFM job.
MODES: dict[str, list[str]] = {"ulfm": [], "respawn": ["--respawn"], "gossip": ["--sync", "gossip"]}


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux ``/proc/<pid>/task/<tid>/children``)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def find_rank_pid(job_pid: int, rank: int) -> int | None:
    """The pid of MPI rank ``rank`` among ``job_pid``'s descendants, or None (not started/gone)."""
    for pid in _descendants(job_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ:
            return pid
    return None


def _updates(out: Path) -> int:
    """Updates logged so far in ``out/records.csv`` (0 when there is none yet)."""
    try:
        with (out / "records.csv").open() as fh:
            return sum(1 for r in csv.DictReader(fh) if r["metric"] == "train_env_steps")
    except (OSError, KeyError, csv.Error):
        return 0


def check_records(out: Path, killed: list[int], logged_at_kill: list[int] | None = None) -> dict[str, Any]:
    """What a user relies on after a failure: complete records, no duplicates, the events.

    ``logged_at_kill[i]``: updates in the records when ``killed[i]`` died; a rank killed after the
    last update (during the final evaluation) is no training failure and has no event."""
    with (out / "records.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    manifests = sorted((out / "manifests").glob("*.json"))
    manifest = json.loads(manifests[-1].read_text()) if manifests else {}
    keys = Counter((r["run_id"], r["episode"], r["metric"]) for r in rows)
    updates = sorted(int(r["episode"]) for r in rows if r["metric"] == "train_env_steps")
    done = int(manifest.get("updates_completed", -1))
    at = logged_at_kill if logged_at_kill is not None else [-1] * len(killed)
    expected = sorted(r for r, u in zip(killed, at) if u < done)
    events = manifest.get("events", [])
    failures = [e for e in events if e.get("event", "rank_failure") == "rank_failure"]
    rejoins = [e for e in events if e.get("event") == "rank_rejoin"]
    failed = sorted(int(r["metric"].rsplit("_", 1)[1]) for r in rows if r["metric"].startswith("rank_failure_"))
    rejoined = sorted(int(r["metric"].rsplit("_", 1)[1]) for r in rows if r["metric"].startswith("rank_rejoin_"))
    main_kpi = {r["metric"] for r in rows if not r["metric"].startswith(("train_", "eval_", "rank_"))}
    return {
        "updates": done,
        "complete": (
            len(manifests) == 1
            and len({r["run_id"] for r in rows}) == 1
            and updates == list(range(1, done + 1))
            and failed == expected
            and sorted(int(e["rank"]) for e in failures) == expected
            and rejoined == sorted(int(e["rank"]) for e in rejoins)
            and bool(main_kpi)
        ),
        "duplicates": sum(n - 1 for n in keys.values() if n > 1),
        "recovery_s": max((float(e["recovery_seconds"]) for e in failures), default=float("nan")),
        "lost_s": sum(float(e["seconds_lost"]) for e in failures),
        "rejoined": len(rejoins),
        "back_s": max((float(e["seconds_since_failure"]) for e in rejoins), default=float("nan")),
        "world_after": int(rejoins[-1]["world_size_after"]) if rejoins else None,
        "rounds_skipped": sum(int(e.get("gossip_rounds_skipped", 0)) for e in failures),
        "identical_checks": int(manifest.get("identical_checks", 0) or 0),
    }


def run_trial(
    ranks: int, updates: int, kills: int, rng: random.Random, workdir: Path, timeout: float, mode: str = "ulfm"
) -> dict[str, Any]:
    """One job of ``updates`` updates (at full size), ``kills`` ranks SIGKILLed from outside at
    random times, in ``mode`` (:data:`MODES`); its outcome."""
    steps = 64 * ranks * updates
    out = workdir / "run"
    marl = str(Path(sys.executable).parent / "marl")
    argv = [marl, "train", "traffic/2x2grid", "--test", "--eval-episodes", "1", "--algo-set", "num_steps=64",
            "--ranks", str(ranks), "--fault-tolerance", "ulfm", "--steps", str(steps), "--out", str(out),
            *MODES[mode]]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_COMM_WORLD", "PMIX_", "PMI_", "CONCORD_MPI"))}
    start = time.monotonic()
    job = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                           start_new_session=True)  # fmt: skip
    killed: list[int] = []
    logged_at_kill: list[int] = []
    next_update: list[float] = []
    alive = list(range(ranks))
    # When: after a random update of the first half of the job (the second kill a few updates
    # later), at a random moment within the next update (rollout, backward, allreduce, checkpoint).
    first = rng.randint(1, max(1, updates // 2))
    targets = [first, first + rng.randint(1, max(1, updates // 3))][:kills]
    try:
        for target in targets:
            while _updates(out) < target and job.poll() is None and time.monotonic() - start < timeout:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.5))
            rank = rng.choice(alive)
            pid = find_rank_pid(job.pid, rank)
            if pid is None or job.poll() is not None:
                break
            logged_at_kill.append(_updates(out))
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            killed.append(rank)
            alive.remove(rank)
            # from outside: the kill to the next update in the records (the job may end first)
            while _updates(out) <= logged_at_kill[-1] and job.poll() is None and time.monotonic() - start < timeout:
                time.sleep(0.05)
            if _updates(out) > logged_at_kill[-1]:
                next_update.append(time.monotonic() - killed_at)
        _, err = job.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)  # our own job's process group only
        job.communicate()
        err = "timed out"
    result: dict[str, Any] = {"mode": mode, "ranks": ranks, "killed": killed, "exit": job.returncode, "error": "",
                              "next_update_s": max(next_update, default=float("nan"))}  # fmt: skip
    result["seconds"] = time.monotonic() - start
    result["stderr"] = err or ""
    if job.returncode != 0:
        result["error"] = _last_message(err or "") or f"exit code {job.returncode}, no message"
    if (out / "records.csv").exists():
        result.update(check_records(out, killed, logged_at_kill))
    return result


def _last_message(err: str) -> str:
    """The last line of ``err`` that says something: progress output ends lines with carriage
    returns, and a killed rank's terminal can leave control bytes (a NUL once hid the message of
    a failed trial), so control characters go and lines without a letter or digit are skipped."""
    err = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", err)  # terminal escape sequences
    text = "".join(c if c.isprintable() else "\n" if c in "\r\n" else " " for c in err)
    lines = [x.strip() for x in text.splitlines() if any(c.isalnum() for c in x)]
    return lines[-1][:200] if lines else ""


@click.command("chaos")
@click.option("--trials", type=int, default=5, help=f"Trials per rank count and mode (1..{MAX_TRIALS}).")
@click.option("--ranks", "ranks_text", default="3", help="Comma-separated rank counts, e.g. 3,4 (each >= 2).")
@click.option("--mode", "mode_text", default="ulfm,respawn,gossip",
              help="Comma-separated modes: ulfm (shrink), respawn (grow back), gossip (root-free push-sum).")  # fmt: skip
@click.option("--kills", type=click.IntRange(1, 2), default=1, help="Ranks killed per trial, one after the other.")
@click.option("--updates", type=int, default=10, help="Updates per training job at full size (64 steps per rank each).")
@click.option("--seed", type=int, default=0, help="Seed of the random choices (which rank, when).")
@click.option("--timeout", type=float, default=300.0, help="Seconds before a trial counts as hung.")
@click.option("--keep-failed", "keep", default="", help="Directory to copy a failed trial's output and stderr into.")
def command(
    trials: int, ranks_text: str, mode_text: str, kills: int, updates: int, seed: int, timeout: float, keep: str
) -> None:
    """Kill a random rank (rank 0 included) of real ULFM training jobs from outside, in each mode;
    print whether each survived with complete, duplicate-free records, and how fast it recovered."""
    from rich.console import Console

    from marl.core.config import check_local_processes
    from marl.core.errors import ConfigError, show, unknown
    from marl.distributed.launch import ulfm_problem

    if not 1 <= trials <= MAX_TRIALS:
        raise ConfigError(f"bad --trials {trials}; allowed: 1..{MAX_TRIALS}")
    try:
        counts = [int(x) for x in ranks_text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"bad --ranks {show(ranks_text)}; expected comma-separated integers, e.g. 3,4") from None
    if not counts or min(counts) < 2 + (kills - 1):
        raise ConfigError(f"bad --ranks {show(ranks_text)}; each count must leave a survivor: >= {kills + 1}")
    modes = [m.strip() for m in mode_text.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise unknown("chaos mode", m, list(MODES))
    if not modes:
        raise ConfigError(f"bad --mode {show(mode_text)}; allowed: a comma list of {', '.join(MODES)}")
    for n in counts:
        check_local_processes("--ranks", n, oversubscribe=True)
    if not 3 <= updates <= 10_000:
        raise ConfigError(f"bad --updates {updates}; allowed: 3..10000")
    problem = ulfm_problem()
    if problem is not None:
        raise ConfigError(f"ULFM is unsupported here: {problem}")
    # a file or pipe gets the whole table (rich would squeeze it to 80 columns)
    console = Console() if sys.stdout.isatty() else Console(width=200)
    rng = random.Random(seed)
    results = []
    for mode in modes:
        for n in counts:
            for t in range(trials):
                # a replacement is not found by its launch rank: respawn mode kills once
                k = 1 if mode == "respawn" else kills
                with (
                    tempfile.TemporaryDirectory() as tmp,
                    console.status(f"{mode}, {n} ranks, trial {t + 1}/{trials}..."),
                ):
                    results.append(run_trial(n, updates, k, rng, Path(tmp), timeout, mode))
                    if keep and not _survived(results[-1]):
                        _keep(Path(tmp), Path(keep) / f"{mode}-{n}ranks-trial{t + 1}", results[-1])
    _report(console, results, modes, counts, kills)


def _report(console: Any, results: list[dict[str, Any]], modes: list[str], counts: list[int], kills: int) -> None:
    """The per-trial table, then one summary line per mode and rank count."""
    from rich.table import Table

    table = Table(title=f"chaos: {kills} kill(s) per trial (traffic/2x2grid)", header_style="bold")
    columns = ("mode", "ranks", "killed", "exit", "updates", "complete", "dup rows", "recovery s", "lost s",
               "next update s", "identical", "back to N s", "wall s")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="right")
    nan = float("nan")
    for r in results:
        identical = "-" if r["mode"] == "gossip" else str(r.get("identical_checks", "-"))
        back_s = f"{r.get('back_s', nan):.1f}" if r["mode"] == "respawn" else "-"
        table.add_row(r["mode"], str(r["ranks"]), ",".join(map(str, r["killed"])) or "-", str(r["exit"]),
                      str(r.get("updates", "-")), "yes" if r.get("complete") else "NO", str(r.get("duplicates", "-")),
                      f"{r.get('recovery_s', nan):.3f}", f"{r.get('lost_s', nan):.2f}", f"{r['next_update_s']:.2f}",
                      identical, back_s, f"{r['seconds']:.0f}")  # fmt: skip
    console.print(table)
    for mode in modes:
        for n in counts:
            mine = [r for r in results if r["ranks"] == n and r["mode"] == mode]
            ok = sum(_survived(r) for r in mine)
            worst = _worst(r.get("recovery_s", nan) for r in mine)
            nxt = _worst(r["next_update_s"] for r in mine)
            line = (f"{mode}, {n} ranks: {ok}/{len(mine)} survived with complete records; worst recovery {worst:.3f} s; "
                    f"worst kill -> next update {nxt:.2f} s")  # fmt: skip
            if mode == "respawn":
                back = [r for r in mine if r.get("world_after") == n]
                line += f"; world back to {n} in {len(back)}/{len(mine)}, worst {_worst(r.get('back_s', nan) for r in back):.1f} s"
            if mode == "gossip":
                line += f"; averaging rounds skipped (writing rank) {sum(r.get('rounds_skipped', 0) for r in mine)}"
            else:
                line += f"; updates lost: {sum(len(r['killed']) for r in mine)} (each failure redoes its update once)"
            console.print(line, markup=False)
    for r in results:
        if r["error"]:
            console.print(f"  {r['mode']}, {r['ranks']} ranks, killed {r['killed']}: {r['error']}", markup=False)


def _keep(workdir: Path, target: Path, result: dict[str, Any]) -> None:
    """Copy a failed trial's output directory and whole stderr to ``target`` (for diagnosis)."""
    import shutil

    if (workdir / "run").exists():
        shutil.copytree(workdir / "run", target / "run", dirs_exist_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    (target / "stderr.txt").write_text(result.get("stderr", ""))
    (target / "result.json").write_text(json.dumps({k: v for k, v in result.items() if k != "stderr"}, default=str))


def _worst(values: Any) -> float:
    """The largest of the measured values (trials without a measurement, NaN, are left out)."""
    found = [float(v) for v in values if v == v]
    return max(found, default=float("nan"))


def _survived(r: dict[str, Any]) -> bool:
    """Exit 0, complete records without duplicates; respawn: the world grew back when it could."""
    ok = r["exit"] == 0 and bool(r.get("complete")) and r.get("duplicates") == 0
    return ok and (r["mode"] != "respawn" or not r["killed"] or r.get("world_after") in (None, r["ranks"]))
