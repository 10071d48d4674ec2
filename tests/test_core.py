"""Core pieces a user relies on: config coercion, error messages, atomic records, CLI errors."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from typing import Literal

import pytest

from marl.cli import main
from marl.core import registry
from marl.core.config import build_config, describe_config, parse_sets
from marl.core.errors import ConfigError, UnknownNameError, unknown
from marl.results.io import atomic_write_text
from marl.results.records import COLUMNS, RecordWriter, Row, read_records


@dataclass
class Toy:
    horizon: int = field(default=100, metadata={"help": "steps per episode"})
    rate: float = 0.5
    libsumo: bool = True
    mode: Literal["a", "b"] = "a"
    name: str | None = None
    ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.horizon < 1:
            raise ConfigError(f"bad horizon {self.horizon}; expected >= 1")


def test_build_config_coerces_cli_strings() -> None:
    cfg = build_config(Toy, {"horizon": 50}, {"rate": "0.25", "libsumo": "false", "mode": "b", "ids": "1,2"})
    assert cfg == Toy(horizon=50, rate=0.25, libsumo=False, mode="b", ids=(1, 2))
    assert build_config(Toy, {"name": "none"}).name is None
    assert build_config(Toy, {"horizon": "1e3"}).horizon == 1000


@pytest.mark.parametrize(
    "override, message",
    [
        ({"horizn": "5"}, "unknown option for Toy 'horizn'; did you mean 'horizon'?"),
        ({"horizon": "ten"}, "bad value for horizon: 'ten'; expected an integer"),
        ({"horizon": "2.5"}, "bad value for horizon: '2.5'; expected an integer"),
        ({"horizon": "2.5e0"}, "bad value for horizon: '2.5e0'; expected an integer"),
        ({"horizon": "1e400"}, "bad value for horizon: '1e400'; expected an integer"),
        ({"rate": "nan"}, "bad value for rate: 'nan'; expected a finite number"),
        ({"rate": "-inf"}, "bad value for rate: '-inf'; expected a finite number"),
        ({"libsumo": "maybe"}, "bad value for libsumo: 'maybe'; expected true or false"),
        ({"mode": "c"}, "bad value for mode: 'c'; allowed: a, b"),
        ({"horizon": "0"}, "bad horizon 0; expected >= 1"),
    ],
)
def test_build_config_rejects_bad_values_with_one_line(override: dict, message: str) -> None:
    with pytest.raises((ConfigError, UnknownNameError)) as info:
        build_config(Toy, override)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_parse_sets_and_describe() -> None:
    assert parse_sets(["a=1", " b = x=y "]) == {"a": "1", "b": "x=y"}
    with pytest.raises(ConfigError, match="bad --set value 'oops'"):
        parse_sets(["oops"])
    text = describe_config(Toy())
    assert "horizon = 100  # steps per episode" in text


def test_unknown_names_closest_match() -> None:
    err = unknown("scenario", "trafic/grid4x4", ["traffic/grid4x4", "grid/ieee33"])
    assert str(err) == (
        "unknown scenario 'trafic/grid4x4'; did you mean 'traffic/grid4x4'? allowed: grid/ieee33, traffic/grid4x4"
    )


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path) -> None:
    target = tmp_path / "table.md"
    atomic_write_text(target, "old")

    class Boom(Exception):
        pass

    def failing(fh):
        fh.write(b"partial")
        raise Boom

    from marl.results.io import atomic_write

    with pytest.raises(Boom):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["table.md"], "the temporary file must be cleaned up"


def test_record_writer_appends_across_writers(tmp_path) -> None:
    row = Row("r1", "traffic/x", "random", "none", "", 0, 0, "delay", 1.5)
    RecordWriter(tmp_path).append([row])
    RecordWriter(tmp_path).append([Row("r2", "traffic/x", "random", "none", "drop=0.1", 1, 0, "delay", 2.0)])
    with (tmp_path / "records.csv").open() as fh:
        lines = list(csv.reader(fh))
    assert tuple(lines[0]) == COLUMNS and len(lines) == 3
    frame = read_records(tmp_path)
    assert list(frame["value"]) == [1.5, 2.0]
    assert list(frame["channel"]) == ["", "drop=0.1"]


def test_record_writer_refuses_foreign_csv(tmp_path) -> None:
    (tmp_path / "records.csv").write_text("a,b\n1,2\n")
    with pytest.raises(Exception, match="expected"):
        RecordWriter(tmp_path)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run", "traffic/nope"], "unknown scenario 'traffic/nope'"),
        (["run", "traffic/grid4x4", "--controller", "max-presure"], "did you mean 'max-pressure'"),
        (["run", "traffic/grid4x4", "--episods", "2"], "did you mean '--episodes'"),
        (["run", "traffic/grid4x4", "--set", "horizn=5"], "unknown --set key"),
        (["run", "traffic/grid4x4", "--set", "noequals"], "bad --set value 'noequals'"),
        (["run", "traffic/grid4x4", "--episodes", "0"], "bad --episodes 0"),
        (["run", "traffic/grid4x4", "--protocol", "telepathy"], "unknown protocol 'telepathy'"),
        (["list", "robots"], "unknown list kind 'robots'"),
        (["run", "nosuch/:x:y"], "unknown scenario 'nosuch/:x:y'"),
        (
            ["run", "warehouse/small", "--controller", "greedy", "--controller-set", "patiense=0"],
            "unknown --controller-set key for controller greedy 'patiense'; did you mean 'patience'?",
        ),
        (["run", "traffic/grid4x4", "--controller", "volt-var"], "unknown controller for traffic"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(argv, expected, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.count("\n") == 1, f"expected one line, got: {err!r}"
    assert "Traceback" not in err


def test_cli_list_shows_every_registered_scenario(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for scenario_id in registry.scenarios():
        assert scenario_id in out
    assert main(["list", "controllers"]) == 0
    assert "max-pressure" in capsys.readouterr().out


def test_cli_help_lists_defaults(capsys) -> None:
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--episodes" in out and "default: 1" in out


def test_cli_bad_out_is_one_line_error(tmp_path, capsys) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert main(["run", "warehouse/small", "--set", "horizon=5", "--out", str(a_file)]) == 2
    assert "it exists and is not a directory" in capsys.readouterr().err


def test_cli_without_arguments_prints_help(capsys) -> None:
    assert main([]) == 0
    assert "Commands:" in capsys.readouterr().out


def test_concurrent_writers_keep_every_row(tmp_path) -> None:
    """Two runs appending into one directory (interleaved) both keep their rows."""
    first, second = RecordWriter(tmp_path), RecordWriter(tmp_path)
    for episode in range(3):
        first.append([Row("a", "s", "m", "none", "", 0, episode, "k", 1.0)])
        second.append([Row("b", "s", "m", "none", "", 1, episode, "k", 2.0)])
    frame = read_records(tmp_path)
    assert sorted(frame["run_id"]) == ["a"] * 3 + ["b"] * 3


def test_writer_refuses_to_pool_runs_with_other_settings(tmp_path) -> None:
    writer = RecordWriter(tmp_path)
    writer.write_manifest("r1", {"scenario": "s/x", "scenario_config": {"horizon": 10}})
    writer.check_compatible("s/x", {"horizon": 10})  # same settings: fine
    writer.check_compatible("s/y", {"horizon": 99})  # another scenario: fine
    with pytest.raises(Exception, match=r"horizon=20 \(was 10\)"):
        writer.check_compatible("s/x", {"horizon": 20})


def test_episode_seeds_of_different_run_seeds_never_overlap() -> None:
    from marl.core.seeding import episode_seed

    seeds = [episode_seed(s, e) for s in range(20) for e in range(5)]
    assert len(set(seeds)) == len(seeds)
    assert episode_seed(7, 0) == 7
    assert all(0 <= x < 2**31 for x in seeds)


def test_run_that_fails_at_start_leaves_no_results_dir(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["run", "traffic/single-intersection", "--set", "end=60", "--set", "route_file=/etc/hostname"]
    assert main([*argv, "--out", str(out)]) == 2
    assert capsys.readouterr().err[-1:] == "\n"
    assert not out.exists()


def test_make_scenario_passes_render_mode_to_the_env() -> None:
    from marl.core.registry import make_scenario

    env = make_scenario("warehouse/small", test=True, render_mode="ansi")
    env.reset(seed=0)
    frame = env.render()
    assert env.render_mode == "ansi"
    assert isinstance(frame, str) and "#" in frame  # walls drawn as text
    assert make_scenario("warehouse/small", test=True).render_mode is None
