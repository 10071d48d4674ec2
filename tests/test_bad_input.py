"""Issue #12: every bad input is one clean line and exit code 2, and nothing is counted twice.

One section per class of input: CLI values, files (maps, --out), checkpoints, records, resource
limits, interruption. Each case is the command a hostile user ran, through the real CLI
(``marl.cli.main``) on the cheapest real scenario (warehouse/small, numpy), unless the point is
a parser alone.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from marl.cli import main
from marl.core.errors import ConcordError, ConfigError

SCENARIO = "warehouse/small"
FIXTURE = Path(__file__).parent / "fixtures" / "report_small"
REPO = Path(__file__).resolve().parents[1]


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The command's stderr, asserted to be exactly one line with no raw control character."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not any(ord(ch) < 32 for ch in err), repr(err)
    return err


# --------------------------------------------------------------------------------------------
# CLI values


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["run", "nodomain"], "unknown scenario 'nodomain'; allowed: "),
        (
            ["run", SCENARIO, "--controller", "random", "--controller-set", "foo=1"],
            "bad --controller-set key 'foo': controller random takes no parameters",
        ),
        (
            ["run", SCENARIO, "--protocol", "broadcast", "--channel", "delay=1.5"],
            "bad channel delay='1.5'; allowed: an integer 0..10000 (steps)",
        ),
        (
            ["run", SCENARIO, "--protocol", "broadcast", "--channel", "delay=1e9"],
            "bad channel delay='1e9'; allowed: an integer 0..10000 (steps)",
        ),
        (["run", SCENARIO, "--out", ""], "bad --out ''"),
        (["run", SCENARIO, "--out", "  "], "bad --out '  '"),
        (["compare", SCENARIO, "--controllers", "greedy", "--out", ""], "bad --out ''"),
        (["run", SCENARIO, "--set", "horizon=5", "--set", "horizon=6"], "bad --set 'horizon': given twice"),
        (["run", "a\x1b[31mb\x00c"], "unknown scenario 'a\\x1b[31mb\\x00c'"),
        (["run", SCENARIO, "--seed", "1\n2"], "'1\\n2' is not a valid integer"),
        (["run", SCENARIO, "--set", "map_file=x\x07y"], "map_file 'x\\x07y' is neither a file"),
    ],
)
def test_cli_values(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = _error_line(capsys)
    assert needle in err
    assert "NoConfig" not in err


# --------------------------------------------------------------------------------------------
# Files: --out, maps


def test_compare_out_that_cannot_be_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me\n")
    base = ["compare", SCENARIO, "--controllers", "greedy", "--seeds", "1", "--set", "horizon=5"]
    assert main([*base, "--out", str(a_file)]) == 2
    assert "exists and is not a directory" in _error_line(capsys)
    assert main([*base, "--out", str(a_file / "sub")]) == 2
    assert "is a file, not a directory" in _error_line(capsys)
    assert a_file.read_text() == "keep me\n"


def _unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create entries in. Root ignores mode bits, so as root
    use sysfs, which refuses new entries to everyone."""
    if os.geteuid() == 0:
        return Path("/sys/concord-no-such-dir")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return locked / "out"


def test_compare_and_report_into_unwritable_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _unwritable_dir(tmp_path)
    assert main(["compare", SCENARIO, "--controllers", "greedy", "--seeds", "1", "--out", str(out)]) == 2
    assert str(out) in _error_line(capsys)
    # The atomic writer itself turns an OSError into a one-line error naming the file.
    from marl.results.io import atomic_write_text

    with pytest.raises(ConcordError, match="cannot write"):
        atomic_write_text(out / "x.txt", "x")


def test_maps_header_rows_bom_and_control_characters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from scenarios.warehouse.layout import MAPS_DIR, MAX_CELLS, load_map, parse_map

    huge = tmp_path / "huge.map"
    huge.write_text("type octile\nheight 2\nwidth 1000000000000\nmap\n..\n..\n")
    with pytest.raises(ConfigError, match=f"at most {MAX_CELLS}"):  # before any allocation
        load_map(huge)
    assert main(["run", SCENARIO, "--set", f"map_file={huge}", "--out", str(tmp_path / "o")]) == 2
    assert "2000000000000 cells" in _error_line(capsys)
    short_rows = "type octile\nheight 2\nwidth 3\nmap\n...\n..\n"
    with pytest.raises(ConfigError, match="<map>:6:3: row has 2 characters, expected 3"):
        parse_map(short_rows)

    small = (MAPS_DIR / "small.map").read_bytes()
    bom = tmp_path / "bom.map"
    bom.write_bytes(b"\xef\xbb\xbf" + small)
    assert (load_map(bom) == load_map(MAPS_DIR / "small.map")).all()

    nul = tmp_path / "nul.map"
    nul.write_bytes(b"type octile\nheight 1\nwidth 3\nmap\n.\x00P\n")
    assert main(["run", SCENARIO, "--set", f"map_file={nul}", "--out", str(tmp_path / "o")]) == 2
    assert "unknown map character '\\x00'" in _error_line(capsys)


def test_compare_validates_scenario_inputs_before_any_cell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "garbage.map"
    garbage.write_bytes(b"\x1b[2J not a map\n")
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                SCENARIO,
                "--controllers",
                "greedy,random",
                "--seeds",
                "2",
                "--set",
                f"map_file={garbage}",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    err = _error_line(capsys)
    assert "expected header 'type'" in err and "\\x1b" in err
    assert not out.exists()  # no cell ran, nothing was written


# --------------------------------------------------------------------------------------------
# Checkpoints


def test_random_bytes_as_policy_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 4)
    assert main(["run", SCENARIO, "--policy", str(junk), "--out", str(tmp_path / "o")]) == 2
    assert "junk.pt" in _error_line(capsys)


# --------------------------------------------------------------------------------------------
# Records (marl report)


def _fixture_rows() -> list[list[str]]:
    with (FIXTURE / "records.csv").open(newline="") as fh:
        return list(csv.reader(fh))


def _results_dir(tmp_path: Path, name: str, rows: list[list[str]] | None = None, raw: bytes = b"") -> Path:
    directory = tmp_path / name
    directory.mkdir()
    if rows is not None:
        with (directory / "records.csv").open("w", newline="") as fh:
            csv.writer(fh, lineterminator="\n").writerows(rows)
    else:
        (directory / "records.csv").write_bytes(raw)
    return directory


def test_malformed_records_name_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (FIXTURE / "records.csv").read_text()
    n = len(text.splitlines())
    cases = {
        "quote": (
            (text + 'x,fixture/toy,"alpha,none,,0,0,delay,1\n').encode(),
            f"records.csv:{n + 1}: unterminated quote",
        ),
        "fields": (
            (text + "x,fixture/toy,alpha,none,,0,0,delay,1,2,3,4\n").encode(),
            f"records.csv:{n + 1}: 12 fields, expected 9",
        ),
        "binary": (text.encode() + b"\x90\xff\x00\n", f"records.csv:{n + 1}: not UTF-8 text"),
        "nul": ((text + "x,fixture/toy,alpha,none,,0,0,de\x00lay,1\n").encode(), f"records.csv:{n + 1}: NUL byte"),
        "value": (
            (text + "x,fixture/toy,alpha,none,,0,0,delay,fast\n").encode(),
            f"records.csv:{n + 1}: value 'fast' is not a number",
        ),
    }
    for name, (raw, needle) in cases.items():
        directory = _results_dir(tmp_path, name, raw=raw)
        assert main(["report", str(directory), "--no-figures", "--quiet"]) == 2, name
        err = _error_line(capsys)
        assert needle in err, (name, err)
    is_dir = tmp_path / "dir"
    (is_dir / "records.csv").mkdir(parents=True)
    assert main(["report", str(is_dir)]) == 2
    assert "is a directory, not a records file" in _error_line(capsys)
    bom = _results_dir(tmp_path, "bom", raw=b"\xef\xbb\xbf" + text.encode())
    assert main(["report", str(bom), "--no-figures", "--quiet"]) == 0
    capsys.readouterr()


def test_report_of_a_file_says_it_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = _results_dir(tmp_path, "res", rows=_fixture_rows())
    assert main(["report", str(directory / "records.csv")]) == 2
    err = _error_line(capsys)
    assert "is a file" in err and f"did you mean '{directory}'" in err and "does not exist" not in err


def test_report_refuses_a_measurement_counted_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _fixture_rows()
    again = list(rows[1])
    again[0] = "same-seed-again"
    directory = _results_dir(tmp_path, "dup", rows=[*rows, again])
    assert main(["report", str(directory), "--no-figures", "--quiet"]) == 2
    err = _error_line(capsys)
    assert "measure the same thing twice" in err
    assert f"records.csv:2 (run {rows[1][0]})" in err and f"records.csv:{len(rows) + 1} (run same-seed-again)" in err
    assert not (directory / "report").exists()


@pytest.mark.parametrize("bad", ["inf", "nan"])
def test_report_names_seeds_left_out_for_non_finite_values(
    tmp_path: Path, bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _fixture_rows()
    header = rows[0]
    col = {name: i for i, name in enumerate(header)}
    target = rows[1]
    group = [target[col[k]] for k in ("scenario", "method", "protocol", "channel")]
    for row in rows[1:]:  # one episode of one seed: that seed's mean becomes non-finite
        if (
            [row[col[k]] for k in ("scenario", "method", "protocol", "channel")] == group
            and row[col["seed"]] == "2"
            and row[col["metric"]] == "delay"
        ):
            row[col["value"]] = bad
            break
    directory = _results_dir(tmp_path, bad, rows=rows)
    assert main(["report", str(directory), "--no-figures", "--quiet", "--metric", "delay"]) == 0
    capsys.readouterr()
    markdown = (directory / "report" / "report.md").read_text()
    assert f"seed 2: delay={bad}" in markdown and "left out" in markdown
    with (directory / "report" / "summary.csv").open() as fh:
        summary = list(csv.DictReader(fh))
    seeds = {
        r[col["seed"]] for r in rows[1:] if [r[col[k]] for k in ("scenario", "method", "protocol", "channel")] == group
    }
    line = next(
        r for r in summary if [r["method"], r["protocol"], r["channel"]] == group[1:] and r["metric"] == "delay"
    )
    assert len(seeds) >= 3 and int(line["n_seeds"]) == len(seeds) - 1


# --------------------------------------------------------------------------------------------
# Resource limits


def test_local_process_limit() -> None:
    from marl.core.config import check_local_processes

    check_local_processes("--ranks", 8, cores=2)
    with pytest.raises(ConfigError, match=r"bad --ranks 9; allowed: 1\.\.8 .*--oversubscribe"):
        check_local_processes("--ranks", 9, cores=2)
    check_local_processes("--ranks", 9, oversubscribe=True, cores=2, memory=2**34)
    with pytest.raises(ConfigError, match=r"bad --ranks 100000; allowed: 1\.\.3 even with --oversubscribe"):
        check_local_processes("--ranks", 100_000, oversubscribe=True, cores=2, memory=2**30)


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", SCENARIO, "--controllers", "greedy", "--ranks", "100000"],
        ["compare", SCENARIO, "--controllers", "greedy", "--ranks", "100000", "--oversubscribe"],
        ["compare", SCENARIO, "--controllers", "greedy", "--jobs", "100000"],
        ["compare", SCENARIO, "--controllers", "greedy", "--seeds", "100000"],
        ["train", "traffic/2x2grid", "--ranks", "100000", "--steps", "2000", "--set", "end=300"],
        ["train", "traffic/2x2grid", "--ranks", "100000", "--oversubscribe", "--steps", "2000"],
    ],
)
def test_resource_limits_refused_before_anything_starts(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    assert "100000; allowed: 1.." in _error_line(capsys)
    assert not out.exists()


def test_report_reps_and_bucket_size_are_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(FIXTURE), "--reps", "1000000000"]) == 2
    assert "bad --reps 1000000000; allowed: 100..100000" in _error_line(capsys)
    pytest.importorskip("mpi4py")
    from marl.distributed import DistConfig

    for bad in (float("inf"), float("nan"), 1e9):
        with pytest.raises(ConfigError, match="bad value for bucket_mb"):
            DistConfig(bucket_mb=bad)


def test_mpiexec_command_refuses_too_many_ranks() -> None:
    pytest.importorskip("mpi4py")
    from marl.distributed import DistConfig
    from marl.distributed.launch import mpiexec_command

    with pytest.raises(ConfigError, match="bad --ranks 100000"):
        mpiexec_command(DistConfig(ranks=100_000), [sys.argv[0]], cores=2)
    assert "--oversubscribe" in mpiexec_command(DistConfig(ranks=2, oversubscribe=True), [sys.argv[0]], cores=24)


# --------------------------------------------------------------------------------------------
# Interruption: ranks die with their launcher; their output is plain text when redirected

_RANK_SCRIPT = """
import os, sys, time
from rich.console import Console
from marl.distributed.config import DistConfig
from marl.distributed.launch import launch_if_needed

launch_if_needed(DistConfig(ranks=2), sys.argv)
Console().print("[bold red]rank up[/bold red]")
if sys.argv[2] == "sleep":
    open(os.path.join(sys.argv[1], f"rank-{os.getpid()}"), "w").close()
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has died; only its parent has not reaped it


def _wait_for(condition, seconds: float) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``condition`` until true or ``seconds`` pass (a deadline, not a timing assertion)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux only")
def test_ranks_die_with_their_launcher_and_write_no_colour_codes(tmp_path: Path) -> None:
    pytest.importorskip("mpi4py")
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_", "CONCORD_"))}
    env["PYTHONPATH"] = str(REPO)
    env.pop("TTY_COMPATIBLE", None)

    log = tmp_path / "out.txt"
    with log.open("w") as fh:  # redirected to a file, as `marl compare ... --ranks 2 > file`
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path), "print"],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=300,
        )
    text = log.read_text()
    assert done.returncode == 0, text
    assert text.count("rank up") == 2 and "\x1b[" not in text

    launcher = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), "sleep"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert _wait_for(lambda: len(list(tmp_path.glob("rank-*"))) == 2, 240), "ranks did not start"
        ranks = [int(p.name.split("-")[1]) for p in tmp_path.glob("rank-*")]
        assert all(_alive(pid) for pid in ranks)
        os.kill(launcher.pid, signal.SIGKILL)  # as the OOM killer would: no chance to clean up
        launcher.wait()
        gone = _wait_for(lambda: not any(_alive(pid) for pid in ranks), 60)
        for pid in ranks:  # never leave our own orphans behind, even when the test fails
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        assert gone, "ranks outlived their launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_train_refuses_an_empty_out_and_canonicalises_the_channel(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "traffic/2x2grid", "--out", ""]) == 2
    assert "bad --out ''" in _error_line(capsys)
    # The channel is recorded in marl run's one spelling, so a report never splits one setting in two.
    import csv

    from comms.channel import parse_channel

    out = tmp_path / "tr"
    argv = ["train", "traffic/2x2grid", "--test", "--no-preset", "--steps", "64", "--algo-set", "num_steps=32",
            "--protocol", "neighbours", "--channel", "drop=0.2,bits=8", "--eval-episodes", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    with (out / "records.csv").open() as fh:
        channels = {row["channel"] for row in csv.DictReader(fh)}
    assert channels == {parse_channel("drop=0.2,bits=8").canonical()} != {"drop=0.2,bits=8"}
