"""Training runs and their records: resume mid-episode is bit-exact, a resumed run drops the dead
run's rows past its checkpoint, evaluation plays marl run's episodes, repeated runs never record
an episode twice, a bad --out fails before any output.

Real SUMO runs: traffic/single-intersection, 64-step episodes (end=320, 5 s decisions).
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import torch

from marl.cli import main
from marl.training import TrainRequest, load_checkpoint, train

SCENARIO = "traffic/single-intersection"
SHORT = {"end": "320"}
# 32-step rollouts: every other checkpoint falls in the middle of a 64-step episode.
HALF = {
    "num_steps": "32",
    "num_minibatches": "2",
    "update_epochs": "2",
    "eval_every": "0",
    "checkpoint_every": "1",
    "keep_checkpoints": "5",
}


def _request(out: Path, steps: int, **kw) -> TrainRequest:
    kw.setdefault("eval_episodes", 0)
    return TrainRequest(
        scenario=SCENARIO, steps=steps, overrides=dict(SHORT), algo_overrides=dict(HALF), out=str(out), **kw
    )


def _records(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((out / "records.csv").open()))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_the_middle_of_an_episode_is_bit_exact(tmp_path):
    straight = train(_request(tmp_path / "a", 96))  # 3 updates, one uninterrupted run
    train(_request(tmp_path / "b", 32))  # 1 update: the checkpoint is at step 32 of episode 0
    assert load_checkpoint(tmp_path / "b")["episode"]["actions"].shape[0] == 32
    resumed = train(_request(tmp_path / "b", 96, resume=str(tmp_path / "b")))
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert _same(a["model"], b["model"])
    assert all(
        torch.equal(a["optimizer"]["state"][k]["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])
        for k in a["optimizer"]["state"]
    )
    assert a["episodes"] == b["episodes"] == 1
    # the training return of the episode that spans the resume is the uninterrupted one
    assert straight.train_returns[0] == resumed.train_returns[0]


def test_resume_drops_the_dead_runs_rows_past_its_checkpoint(tmp_path):
    out = tmp_path / "tr"
    first = train(_request(out, 96, eval_episodes=1))  # updates 1..3, checkpoints 1..3, final eval
    # as if it had died after update 3 with its newest checkpoint at update 2
    resumed = train(_request(out, 96, eval_episodes=1, resume=str(out / "checkpoints" / "update-000002.pt")))
    rows = _records(out)
    curve = Counter((r["metric"], r["episode"]) for r in rows if r["metric"].startswith("train_"))
    assert curve and max(curve.values()) == 1  # one value per metric and update
    by_run = Counter(r["run_id"] for r in rows if r["metric"] == "train_env_steps")
    assert by_run == {first.run_id: 2, resumed.run_id: 1}
    finals = [r for r in rows if r["metric"] == "delay"]
    assert [r["run_id"] for r in finals] == [resumed.run_id]  # the dead run's final eval is gone


def test_final_evaluation_plays_marl_runs_episodes(tmp_path):
    out, run_out = tmp_path / "tr", tmp_path / "run"
    args = ["--set", "end=320", "--seed", "3"]
    assert (
        main(
            [
                "train",
                SCENARIO,
                *args,
                "--steps",
                "32",
                "--algo-set",
                "num_steps=32",
                "--eval-episodes",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert main(["run", SCENARIO, *args, "--episodes", "3", "--policy", str(out), "--out", str(run_out)]) == 0

    def delays(d: Path) -> list[str]:
        return [r["value"] for r in _records(d) if r["metric"] == "delay"]

    assert len(delays(out)) == 3 and delays(out) == delays(run_out)
    assert len(set(delays(out))) > 1  # three different episodes, not one seed three times


def test_repeated_run_resumes_and_never_records_an_episode_twice(tmp_path, capsys):
    out = tmp_path / "r"
    base = ["run", SCENARIO, "--set", "end=320", "--controller", "fixed-time", "--out", str(out)]
    assert main([*base, "--episodes", "2"]) == 0  # as if killed during episode 2 of 3
    assert main([*base, "--episodes", "3"]) == 0
    assert main([*base, "--episodes", "3"]) == 0  # nothing left to play
    keys = Counter((r["seed"], r["episode"], r["metric"]) for r in _records(out))
    assert max(keys.values()) == 1 and {k[1] for k in keys} == {"0", "1", "2"}
    # another request that would write the same keys (a policy scored in its training directory,
    # whose final evaluation holds ippo seed 0 episode 0) is refused
    tr = tmp_path / "tr"
    assert (
        main(
            [
                "train",
                SCENARIO,
                "--set",
                "end=320",
                "--steps",
                "32",
                "--algo-set",
                "num_steps=32",
                "--eval-episodes",
                "1",
                "--out",
                str(tr),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["run", SCENARIO, "--set", "end=320", "--policy", str(tr), "--out", str(tr)]) == 2
    err = capsys.readouterr().err.strip()
    assert "from another request" in err and len(err.splitlines()) == 1


def test_bad_out_fails_before_any_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", SCENARIO, "--steps", "32", "--out", str(blocker)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip().count("\n") == 0
    assert "is not a directory" in captured.err


def test_evaluate_hint_is_shell_quoted(tmp_path, capsys):
    out = tmp_path / "with space"
    assert (
        main(
            [
                "train",
                SCENARIO,
                "--set",
                "end=320",
                "--steps",
                "32",
                "--algo-set",
                "num_steps=32",
                "--eval-episodes",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert f"--policy '{out}'" in capsys.readouterr().out


def test_second_fresh_training_into_the_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "tr"
    args = [
        "train",
        SCENARIO,
        "--set",
        "end=320",
        "--steps",
        "32",
        "--algo-set",
        "num_steps=32",
        "--eval-episodes",
        "1",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2  # its final evaluation would be recorded twice under one key
    err = capsys.readouterr().err.strip()
    assert f"--resume {out}" in err and len(err.splitlines()) == 1
    assert main([*args, "--seed", "1"]) == 0  # another seed is another key: fine
