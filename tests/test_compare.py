"""`marl compare`: grid planning, real runs on the cheapest scenario, resume without duplicates,
failure isolation, and bad input. Real cells run warehouse/small (numpy) with a short horizon."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comms.channel import parse_channel
from marl.cli import main
from marl.compare import cell_key, plan_grid

SCENARIO = "warehouse/small"
SHORT = ["--set", "horizon=30"]


def _specs(*texts: str) -> list:
    """Channel specs as the CLI hands them to plan_grid: parsed once, at the edge."""
    return [parse_channel(t) for t in texts]


def _rows(out: Path) -> list[tuple[str, ...]]:
    """Rows of the merged records.csv without run_id (which differs between attempts)."""
    with (out / "records.csv").open() as fh:
        return [
            tuple(r[c] for c in ("method", "protocol", "channel", "seed", "episode", "metric", "value"))
            for r in csv.DictReader(fh)
        ]


def _assert_complete(out: Path, cells: int, metrics_per_episode: int | None = None) -> list[tuple[str, ...]]:
    rows = _rows(out)
    keys = [r[:6] for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows in the merged view"
    settings = {r[:4] for r in rows}
    assert len(settings) == cells
    if metrics_per_episode is not None:
        assert len(rows) == cells * metrics_per_episode
    return rows


def test_plan_grid_runs_non_talking_controllers_once():
    plan = plan_grid(
        SCENARIO, methods=["greedy"], protocols=["none", "neighbours"], channels=_specs("", "drop=0.3"), seeds=2
    )
    assert [(c.protocol, c.channel, c.seed) for c in plan.cells] == [("none", "", 0), ("none", "", 1)]
    assert len(plan.skipped) == 3 and all("does not read messages" in s.reason for s in plan.skipped)
    talking = plan_grid(
        "traffic/grid4x4",
        methods=["max-pressure-coordinated"],
        protocols=["none", "neighbours"],
        channels=_specs("drop=0", "drop=0.3"),
        seeds=3,
    )
    # drop=0 is the perfect channel (""). Protocol none sends nothing: once per seed on the perfect
    # channel; neighbours on both channel settings.
    assert sorted({(c.protocol, c.channel) for c in talking.cells}) == [
        ("neighbours", ""),
        ("neighbours", "drop=0.3"),
        ("none", ""),
    ]
    assert len(talking.cells) == 3 * 3 == len({c.key for c in talking.cells})
    assert [(s.protocol, s.channel) for s in talking.skipped] == [("none", "drop=0.3")]
    # One setting, however it is spelled: canonical spec in cells, keys and the channel column.
    spelled = plan_grid(
        "traffic/grid4x4",
        methods=["max-pressure-coordinated"],
        protocols=["neighbours"],
        channels=_specs("drop=0.3,bits=8", "bits=8,drop=0.3", "bits=8, drop=0.30,delay=0"),
        seeds=1,
    )
    assert [(c.channel, c.key) for c in spelled.cells] == [
        ("bits=8,drop=0.3", "max-pressure-coordinated__neighbours__bits=8_drop=0.3__seed0")
    ]
    assert cell_key("a", "none", "drop=0.3,delay=1", 2) == "a__none__drop=0.3_delay=1__seed2"
    assert cell_key("a", "none", "", 0) == "a__none__perfect__seed0"


def test_bad_input_fails_before_any_cell_runs(tmp_path, capsys):
    out = str(tmp_path / "x")
    assert main(["compare", SCENARIO, "--controllers", "greedyy", "--out", out]) == 2
    assert "did you mean 'greedy'" in capsys.readouterr().err
    assert main(["compare", SCENARIO, "--controllers", "greedy", "--set", "horizn=5", "--out", out]) == 2
    assert "did you mean 'horizon'" in capsys.readouterr().err
    assert main(["compare", SCENARIO, "--controllers", "greedy", "--protocols", "gosip", "--out", out]) == 2
    assert "did you mean 'gossip'" in capsys.readouterr().err
    assert main(["compare", SCENARIO, "--out", out]) == 2
    assert "give --controllers a,b and/or --policy NAME=PATH, or --algo NAME" in capsys.readouterr().err
    assert main(["compare", SCENARIO, "--controllers", "greedy", "--seeds", "0", "--out", out]) == 2
    assert main(["compare", SCENARIO, "--controllers", "greedy", "--channel", "drop=0.1,drop=0.2", "--out", out]) == 2
    assert "'drop' given twice" in capsys.readouterr().err
    assert not Path(out).exists()


def test_resume_skips_finished_cells_and_never_duplicates(tmp_path, capsys):
    out = tmp_path / "grid"
    args = ["compare", SCENARIO, "--controllers", "greedy", "--seeds", "3", "--jobs", "2", *SHORT, "--out", str(out)]
    assert main(args) == 0
    first = _assert_complete(out, cells=3)
    assert "3 run now, 0 already done, 0 failed" in capsys.readouterr().out

    cells = sorted((out / "cells").iterdir())
    # An interrupted cell: rows written, done marker missing (the marker is written last).
    partial = cells[0]
    (partial / "done.json").unlink()
    with (partial / "records.csv").open("a") as fh:
        fh.write("bogus,warehouse/small,greedy,none,,0,0,throughput,999.0\n")
    # A cell that never started.
    import shutil

    shutil.rmtree(cells[1])
    kept = cells[2] / "done.json"
    kept_text, kept_mtime = kept.read_text(), kept.stat().st_mtime_ns
    (out / "records.csv").unlink()

    assert main(args) == 0
    assert "2 run now, 1 already done, 0 failed" in capsys.readouterr().out
    second = _assert_complete(out, cells=3)
    assert sorted(second) == sorted(first)  # same seeds -> same values, no bogus row, no duplicate
    assert kept.read_text() == kept_text and kept.stat().st_mtime_ns == kept_mtime

    # Same directory, different settings: refused rather than mixing incomparable cells.
    assert main([*args[:-2], "--episodes", "2", "--out", str(out)]) == 2
    assert "different episodes" in capsys.readouterr().err


def test_one_failing_cell_does_not_stop_the_others(tmp_path, capsys):
    out = tmp_path / "grid"
    args = [
        "compare",
        SCENARIO,
        "--controllers",
        "greedy,random",
        "--seeds",
        "1",
        "--jobs",
        "2",
        *SHORT,
        "--out",
        str(out),
    ]
    assert main([*args, "--inject-failure", r"^random__|:x:"]) == 1
    captured = capsys.readouterr()
    assert "1 failed" in captured.out and "random__none__perfect__seed0" in captured.err
    assert ":x:" in captured.err and "\u274c" not in captured.err  # user text printed verbatim, no emoji
    failed_dir = out / "cells" / "random__none__perfect__seed0"
    assert "injected failure" in (failed_dir / "error.txt").read_text()
    assert not (failed_dir / "done.json").exists()
    assert json.loads((out / "failures.json").read_text()).keys() == {"random__none__perfect__seed0"}
    _assert_complete(out, cells=1)

    # The report works on the partial grid and says what is missing.
    assert main(["report", str(out), "--format", "md", "--no-figures", "--quiet"]) == 0
    assert "1 cell(s) failed" in (out / "report" / "report.md").read_text()

    # Rerun: only the failed cell runs; afterwards the grid is complete.
    assert main(args) == 0
    assert "1 run now, 1 already done, 0 failed" in capsys.readouterr().out
    _assert_complete(out, cells=2)
    assert json.loads((out / "failures.json").read_text()) == {}


def test_killed_compare_resumes_to_a_complete_grid(tmp_path):
    out = tmp_path / "grid"
    marl = str(Path(sys.executable).with_name("marl"))  # the installed script, as a user runs it
    cmd = [
        marl,
        "compare",
        SCENARIO,
        "--controllers",
        "greedy",
        "--seeds",
        "3",
        "--jobs",
        "1",
        "--set",
        # A pool worker runs cell after cell in one process, so a short cell lasts milliseconds and all
        # three could finish between two polls; 10,000 steps make a cell last about 2 s.
        "horizon=10000",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and not list((out / "cells").glob("*/done.json")):
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the parent and its cell process, mid-grid
    finally:
        proc.wait(timeout=30)
    finished = len(list((out / "cells").glob("*/done.json")))
    assert 1 <= finished < 3, "the kill should land mid-way"
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{3 - finished} run now, {finished} already done" in rerun.stdout
    _assert_complete(out, cells=3)


def test_stale_cells_of_an_earlier_compare_are_ignored(tmp_path, capsys):
    out = tmp_path / "grid"
    assert main(["compare", SCENARIO, "--controllers", "greedy", "--seeds", "2", *SHORT, "--out", str(out)]) == 0
    capsys.readouterr()
    # Another comparison into the same directory: the greedy cells stay on disk but are not part of it.
    assert main(["compare", SCENARIO, "--controllers", "random", "--seeds", "1", *SHORT, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "2 cell director(ies)" in err and "greedy__none__perfect__seed0" in err
    assert len(list((out / "cells").glob("*/done.json"))) == 3
    rows = _assert_complete(out, cells=1)
    assert {r[0] for r in rows} == {"random"}
    manifests = list((out / "manifests").glob("*.json"))
    assert len(manifests) == 1 and "random" in manifests[0].read_text()
    assert main(["report", str(out), "--format", "csv,md", "--no-figures", "--quiet"]) == 0
    with (out / "report" / "summary.csv").open() as fh:
        assert {r["method"] for r in csv.DictReader(fh)} == {"random"}
    report = (out / "report" / "report.md").read_text()
    assert "2 cell director(ies) in cells/ are not in this comparison's grid.json" in report
    assert "greedy__none__perfect__seed1" in report


@pytest.mark.mpi
def test_cells_spread_over_mpi_ranks(tmp_path):
    """--ranks 2 relaunches under mpiexec; rank r runs cells i % 2 == r; rank 0 merges."""
    pytest.importorskip("mpi4py", reason="MPI ranks need mpi4py")
    out = tmp_path / "grid"
    marl = str(Path(sys.executable).with_name("marl"))
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    done = subprocess.run(
        [
            marl,
            "compare",
            SCENARIO,
            "--controllers",
            "greedy,random",
            "--seeds",
            "1",
            *SHORT,
            "--ranks",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "2 run now, 0 already done, 0 failed" in done.stdout and "(world size 2)" in done.stdout
    assert json.loads((out / "grid.json").read_text())["world_size"] == 2
    pids = {json.loads(p.read_text())["pid"] for p in (out / "cells").glob("*/done.json")}
    assert len(pids) == 2  # each rank runs its cell in its own worker process
    _assert_complete(out, cells=2)


@pytest.mark.slow
def test_algo_cells_train_and_report(tmp_path):
    """--algo: each cell trains (marl.training) and its final evaluation lands in the table."""
    pytest.importorskip("marl.training", reason="training not built")
    out = tmp_path / "grid"
    assert (
        main(
            [
                "compare",
                "traffic/single-intersection",
                "--algo",
                "ippo",
                "--steps",
                "64",
                "--seeds",
                "1",
                "--set",
                "end=150",
                "--jobs",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = _rows(out)
    assert {r[0] for r in rows} == {"ippo"}
    assert any(r[5] == "train_env_steps" for r in rows) and any(r[5] == "delay" for r in rows)
    assert main(["report", str(out), "--metric", "delay", "--format", "csv", "--no-figures", "--quiet"]) == 0
    with (out / "report" / "summary.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    delays = [float(r[6]) for r in rows if r[5] == "delay"]
    assert float(row["mean"]) == pytest.approx(sum(delays) / len(delays))


def test_algo_settings_are_a_grid_checked_before_any_cell():
    plan = plan_grid(
        SCENARIO,
        methods=["ippo", "mappo"],
        kind="algo",
        algo_axes={"learning_rate": ["3e-4", "1e-3"], "num_steps": ["32"]},
        seeds=2,
        steps=64,
    )
    labels = list(dict.fromkeys(c.label for c in plan.cells))
    assert labels == [
        "ippo[learning_rate=3e-4,num_steps=32]",
        "ippo[learning_rate=1e-3,num_steps=32]",
        "mappo[learning_rate=3e-4,num_steps=32]",
        "mappo[learning_rate=1e-3,num_steps=32]",
    ]
    assert len(plan.cells) == 8 and len({c.key for c in plan.cells}) == 8
    assert plan.cells[0].to_json()["algo_overrides"] == {"learning_rate": "3e-4", "num_steps": "32"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--algo", "ippo", "--algo-set", "learning_rat=1e-3"], "learning_rat"),
        (["--algo", "ippo", "--algo-set", "learning_rate"], "expected KEY=V1,V2"),
        (["--algo", "ippo", "--algo-set", "learning_rate=1e-3", "--algo-set", "learning_rate=3e-4"], "given twice"),
        (["--controllers", "greedy", "--algo-set", "learning_rate=1e-3"], "--algo-set needs --algo"),
        (["--algo", "ippo,ipo"], "did you mean 'ippo'"),
    ],
)
def test_bad_sweep_is_one_line_before_any_cell(tmp_path, capsys, argv, message):
    out = tmp_path / "sweep"
    assert main(["compare", SCENARIO, *argv, "--steps", "64", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (out / "cells").exists()


@pytest.mark.slow
def test_sweep_cells_are_labelled_by_setting_and_ranked(tmp_path):
    pytest.importorskip("marl.training", reason="training not built")
    out = tmp_path / "sweep"
    argv = ["compare", SCENARIO, *SHORT, "--algo", "ippo", "--algo-set", "learning_rate=3e-4,1e-3"]
    argv += ["--algo-set", "num_steps=32", "--steps", "64", "--seeds", "1", "--jobs", "2", "--out", str(out)]
    assert main(argv) == 0
    rows = _assert_complete(out, cells=2)
    methods = {r[0] for r in rows}
    assert methods == {"ippo[learning_rate=3e-4,num_steps=32]", "ippo[learning_rate=1e-3,num_steps=32]"}
    assert main(["report", str(out), "--metric", "throughput", "--format", "md", "--no-figures", "--quiet"]) == 0
    report = (out / "report" / "report.md").read_text()
    ranking = [line.split(" | ") for line in report.split("Ranked by mean", 1)[1].splitlines()]
    ranked = [(cols[1], float(cols[4].split()[0])) for cols in ranking if cols[0] in ("| 1", "| 2", "| 2=")]
    assert sorted(m for m, _ in ranked) == sorted(methods)
    assert ranked[0][1] >= ranked[1][1]  # throughput: higher is better, best first


def _cell_rows(out: Path) -> dict[str, list[tuple[str, ...]]]:
    """Each finished cell's rows (without run_id), by cell directory name."""
    rows = {}
    for records in sorted((out / "cells").glob("*/records.csv")):
        with records.open() as fh:
            rows[records.parent.name] = [
                tuple(r[c] for c in ("method", "protocol", "seed", "episode", "metric", "value"))
                for r in csv.DictReader(fh)
            ]
    return rows


def test_cells_sharing_a_worker_equal_cells_in_fresh_processes(tmp_path):
    """A pool worker runs cell after cell (one import of torch and libsumo for all of them); every
    cell's records must equal the same cell run alone in a fresh process: a traffic simulation
    after a worker's first runs forked from a clean zygote, and nothing a cell leaves behind
    (global RNGs, torch's threads, a closed env) may change the next one. That forked episodes
    equal fresh processes' even where SUMO's traffic depends on the heap is
    tests/test_traffic_determinism.py's; grid4x4's short episodes here do not."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from marl.compare import execute_cell, run_grid

    pytest.importorskip("libsumo")
    policy = Path(__file__).parents[1] / "results" / "reference" / "checkpoints" / "grid4x4-local-ippo-none.pt"
    plan = plan_grid(
        "traffic/grid4x4",
        methods=["max-pressure", "random"],
        seeds=1,
        overrides={"end": "300"},
        policies={"ippo-local": str(policy)},
    )
    shared, fresh = tmp_path / "shared", tmp_path / "fresh"
    outcomes = run_grid(plan, shared, jobs=1)
    assert [o.status for o in outcomes] == ["done"] * 3
    pids = {json.loads(p.read_text())["pid"] for p in (shared / "cells").glob("*/done.json")}
    assert len(pids) == 1, "one worker ran all three cells"

    # The reference: every cell alone in a fresh spawned process (what max_tasks_per_child=1 did).
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=context, max_tasks_per_child=1) as pool:
        assert [o.status for o in pool.map(execute_cell, plan.cells, [str(fresh)] * 3)] == ["done"] * 3
    got, want = _cell_rows(shared), _cell_rows(fresh)
    assert len(want) == 3 and all(want.values())
    assert got == want
