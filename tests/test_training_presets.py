"""Scenario training presets (``marl train traffic/<map>`` without options) and ``marl bench learn``'s
plan: seeds x methods, every classical controller, one results directory, marl report's statistics.

The bench test runs real SUMO jobs (6 short processes, ~30 s on a loaded 2-core machine).
"""

from __future__ import annotations

import json

import pytest

from marl.bench.learn import _learners, plan_jobs
from marl.cli import main
from marl.core import registry
from marl.core.errors import ConcordError
from marl.training import load_checkpoint
from marl.training.request import with_preset


def test_preset_fills_only_what_the_user_did_not_give():
    preset = registry.scenario_spec("traffic/cologne8").training
    algo, protocol, steps, algo_set, note = with_preset("traffic/cologne8")
    assert (algo, protocol, steps, algo_set) == (preset.algo, preset.protocol, preset.steps, dict(preset.algo_set))
    assert note.startswith("traffic/cologne8 training preset: --algo ")
    # another algorithm: the preset's --algo-set keys would not fit it, so none is applied
    algo, _, steps, algo_set, _ = with_preset("traffic/cologne8", algo="mappo", steps=64)
    assert (algo, steps, algo_set) == ("mappo", 64, {})
    # the user's --algo-set wins key by key
    _, _, _, algo_set, _ = with_preset("traffic/cologne8", algo_overrides={"learning_rate": "0.5"})
    assert algo_set["learning_rate"] == "0.5"
    # a map without a measured preset says so
    assert "no training sweep" in registry.scenario_spec("traffic/2x2grid").training.note


def test_cologne8_preset_is_the_measured_learner(capsys):
    assert registry.scenario_spec("traffic/cologne8").training.algo == "idqn"
    assert main(["train", "traffic/cologne8", "--show-config"]) == 0
    out = capsys.readouterr().out
    assert "training preset: --algo idqn" in out and "n_step = " in out
    assert main(["train", "traffic/cologne8", "--algo", "ippo", "--show-config"]) == 0
    assert "clip_coef" in capsys.readouterr().out


def test_bench_plan_covers_every_controller_and_seed(tmp_path):
    names = [n for (_, n) in registry.controllers("traffic")]
    jobs = plan_jobs(
        "traffic/2x2grid",
        [("idqn", "none"), ("ippo", "neighbours")],
        names,
        3,
        100,
        2,
        tmp_path,
        ("end=320",),
        ("learning_rate=0.001",),
    )
    assert len(jobs) == 3 * (2 + len(names))
    assert {j.seed for j in jobs} == {0, 1, 2}
    cells = {job.argv[job.argv.index("--out") + 1] for job in jobs}
    assert len(cells) == len(jobs)  # one cell each: training runs never share a checkpoint directory
    for job in jobs:  # the evaluation seed = the job's seed, every option passed on
        argv = list(job.argv)
        assert argv[argv.index("--out") + 1].startswith(str(tmp_path / "cells"))
        assert argv[argv.index("--seed") + 1] == str(job.seed)
        assert "--set=end=320" in argv
        assert ("--algo-set=learning_rate=0.001" in argv) == (job.kind == "train")
    talkers = {j.method for j in jobs if j.kind == "run" and j.protocol != "none"}
    assert talkers == {n for n in names if registry.controller_spec("traffic", n).uses_messages}
    assert _learners("preset", "traffic/cologne8") == [("idqn", "none")]
    with pytest.raises(ConcordError, match="cannot use learned protocol"):
        _learners("idqn+tarmac", "traffic/cologne8")


def test_bench_learn_writes_records_and_report(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "learn", "traffic/single-intersection", "--methods", "idqn", "--steps", "64", "--seeds", "2",
            "--jobs", "1", "--baselines", "fixed-time,max-wave", "--eval-episodes", "1", "--speed-steps", "0",
            "--set", "end=320", "--algo-set", "num_steps=64", "--algo-set", "learning_starts=16", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "learn_bench.json").read_text())
    assert [j["exit_code"] for j in summary["jobs"]] == [0] * 6
    rows = (out / "records.csv").read_text().splitlines()
    methods = {(r.split(",")[2], r.split(",")[5]) for r in rows[1:] if ",delay," in r}
    assert methods == {(m, s) for m in ("idqn", "fixed-time", "max-wave") for s in ("0", "1")}
    text = (out / "learn_bench.md").read_text()
    assert "2 seeds per method" in text and "idqn" in text and "max-wave" in text
    assert (out / "report" / "summary.csv").exists()
    # a rerun finds every cell done and runs nothing again
    assert main(argv) == 0
    again = json.loads((out / "learn_bench.json").read_text())
    assert all(j.get("skipped") for j in again["jobs"])
    assert (out / "records.csv").read_text() == "\n".join(rows) + "\n"


def test_resume_without_options_continues_the_checkpoints_algorithm(tmp_path, capsys):
    # single-intersection's preset is ippo; a resumed idqn run must stay idqn and keep its config
    args = ["--set", "end=320", "--eval-episodes", "0", "--out", str(tmp_path / "r")]
    assert (
        main(
            [
                "train",
                "traffic/single-intersection",
                "--algo",
                "idqn",
                "--steps",
                "64",
                "--algo-set",
                "num_steps=64",
                "--algo-set",
                "learning_starts=16",
                *args,
            ]
        )
        == 0
    )
    assert main(["train", "traffic/single-intersection", "--steps", "128", "--resume", str(tmp_path / "r"), *args]) == 0
    capsys.readouterr()
    state = load_checkpoint(tmp_path / "r")
    assert state["meta"]["algo"] == "idqn" and state["env_steps"] == 128
    assert state["meta"]["algo_config"]["learning_starts"] == 16


def test_no_preset_gives_the_bare_defaults(capsys):
    """grid/ieee33's preset sets learning_rate=1e-3 and init_logstd=-1.5; --no-preset does not."""
    assert main(["train", "grid/ieee33", "--show-config"]) == 0
    with_preset_out = capsys.readouterr().out
    assert "learning_rate = 0.001" in with_preset_out and "init_logstd = -1.5" in with_preset_out
    assert main(["train", "grid/ieee33", "--no-preset", "--show-config"]) == 0
    bare = capsys.readouterr().out
    assert "learning_rate = 0.0003" in bare and "init_logstd = 0.0" in bare


def test_preset_scenario_sets_train_and_travel_with_the_checkpoint(tmp_path, capsys):
    """grid4x4's preset trains IPPO on local sensing: its --set is a default under the user's, for
    the preset's algorithm only, and the checkpoint carries it to marl run --policy."""
    from marl.training.request import preset_sets

    assert registry.scenario_spec("traffic/grid4x4").training.sets == {"sensing": "local"}
    assert preset_sets("traffic/grid4x4", "ippo", {}) == ({"sensing": "local"}, " --set sensing=local")
    assert preset_sets("traffic/grid4x4", "ippo", {"sensing": "full"}) == ({"sensing": "full"}, "")
    assert preset_sets("traffic/grid4x4", "idqn", {}) == ({}, "")
    assert main(["train", "traffic/grid4x4", "--set", "sensing=full", "--show-config"]) == 0
    assert "sensing = 'full'" in capsys.readouterr().out
    out = tmp_path / "run"
    argv = ["train", "traffic/grid4x4", "--test", "--steps", "32", "--algo-set", "num_steps=32", "--eval-episodes", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "--set sensing=local" in capsys.readouterr().err
    assert load_checkpoint(out)["meta"]["overrides"] == {"sensing": "local"}
