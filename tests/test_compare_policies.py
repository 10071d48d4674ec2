"""``marl compare --policy NAME=PATH``: trained policies scored beside the controllers, on the
same episodes, each under its own protocol and every channel setting."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from marl.cli import main

SCENARIO = "traffic/2x2grid"
SHORT = ["--set", "end=320"]
#: A silent (protocol none) IPPO checkpoint kept in the repository (see its README).
SILENT = Path(__file__).parent / "fixtures" / "ckpt-ippo-2x2grid-v1"


def _records(out: Path) -> list[dict[str, str]]:
    with (out / "records.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def talking(tmp_path_factory) -> Path:
    """A tiny IPPO policy trained to talk with protocol neighbours (seconds)."""
    out = tmp_path_factory.mktemp("talking")
    argv = ["train", SCENARIO, *SHORT, "--protocol", "neighbours", "--steps", "32", "--algo-set", "num_steps=32"]
    assert main([*argv, "--eval-episodes", "1", "--out", str(out)]) == 0
    return out


def test_policies_run_beside_controllers_under_their_own_protocol(tmp_path, talking):
    out = tmp_path / "cmp"
    argv = ["compare", SCENARIO, *SHORT, "--controllers", "max-pressure", "--seeds", "1", "--jobs", "2"]
    argv += ["--policy", f"talk={talking}", "--policy", f"silent={SILENT}"]
    assert main([*argv, "--channel", "drop=0", "--channel", "drop=0.3", "--out", str(out)]) == 0
    cells = {(r["method"], r["protocol"], r["channel"]) for r in _records(out)}
    # the talking policy under both channels with the protocol it was trained with; the silent
    # one and the controller once, on a perfect channel
    assert cells == {
        ("max-pressure", "none", ""),
        ("talk", "neighbours", ""),
        ("talk", "neighbours", "drop=0.3"),
        ("silent", "none", ""),
    }
    # a policy cell is exactly `marl run --policy` on the same episode (same seed, same numbers)
    single = tmp_path / "single"
    assert main(["run", SCENARIO, *SHORT, "--policy", str(talking), "--channel", "drop=0.3", "--out", str(single)]) == 0
    lossy = {r["metric"]: r["value"] for r in _records(out) if r["method"] == "talk" and r["channel"]}
    alone = {r["metric"]: r["value"] for r in _records(single)}
    assert lossy == alone and float(alone["delivery_rate"]) < 1.0
    # the same command again reuses every cell and writes no row twice
    before = len(_records(out))
    assert main([*argv, "--channel", "drop=0", "--channel", "drop=0.3", "--out", str(out)]) == 0
    assert len(_records(out)) == before


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ("nopath", "bad --policy 'nopath'; expected NAME=PATH"),
        ("max-pressure={silent}", "it is also a controller"),
        ("a b={silent}", "bad --policy name 'a b'"),
        ("x=does/not/exist", "does/not/exist"),
    ],
)
def test_bad_policy_is_one_line_before_any_cell(tmp_path, capsys, policy, message):
    out = tmp_path / "cmp"
    argv = ["compare", SCENARIO, "--controllers", "max-pressure", "--policy", policy.format(silent=SILENT)]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (out / "cells").exists()


def test_a_policy_name_given_twice_is_refused(tmp_path, capsys):
    argv = ["compare", SCENARIO, "--policy", f"a={SILENT}", "--policy", f"a={SILENT}", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "the name a is given twice" in capsys.readouterr().err


def test_run_refuses_another_protocol_for_a_policy(tmp_path, capsys):
    argv = ["run", SCENARIO, "--policy", str(SILENT), "--protocol", "neighbours", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "talks through the protocol it was trained with" in err and len(err.splitlines()) == 1
