"""Fuzzing the parsers of user input (issue #12): random ``--set`` and ``--channel`` strings, and
random bytes as a warehouse map, a records file and a checkpoint. Each parser either succeeds or
raises a ConcordError (one line, exit code 2 at the CLI) — never any other exception.

Inputs are half pure noise, half near-misses (real keys with odd values, real files with a few
bytes changed), which is where parsers actually break. ``CONCORD_FUZZ_EXAMPLES=2000`` runs a
deeper search than the default (120 examples per parser).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marl.core.errors import ConcordError, one_line

FIXTURE = Path(__file__).parent / "fixtures" / "report_small" / "records.csv"
SMALL_MAP = Path(__file__).resolve().parents[1] / "scenarios" / "warehouse" / "maps" / "small.map"
EXAMPLES = int(os.environ.get("CONCORD_FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _concord_or_success(call: Callable[[], Any]) -> Any:
    """Run ``call``; a ConcordError must carry a message the CLI can print on one line."""
    try:
        return call()
    except ConcordError as exc:
        message = one_line(str(exc))
        assert message and "\n" not in message
        return exc


# Text a user may type: printable noise, control characters, separators and number-ish words.
_WORDS = st.sampled_from(
    [
        "",
        " ",
        "=",
        ",",
        "+",
        "none",
        "nan",
        "inf",
        "-1",
        "0",
        "1",
        "1.5",
        "1e9",
        "1e400",
        "0x10",
        "true",
        "\x00",
        "\x1b[31m",
        "\ufeff",
        "é",
        "9" * 30,
    ]
)
_NOISE = st.text(max_size=20)
_VALUE = st.one_of(_WORDS, _NOISE, st.integers().map(str), st.floats().map(str))


@FUZZ
@given(
    scenario=st.sampled_from(["warehouse/small", "traffic/grid4x4", "grid/ieee33"]),
    pairs=st.lists(
        st.one_of(
            _NOISE,
            st.tuples(
                st.sampled_from(
                    [
                        "horizon",
                        "n_robots",
                        "map_file",
                        "end",
                        "begin",
                        "delta_time",
                        "view_radius",
                        "backlog",
                        "comm_radius",
                        "seed",
                        "x",
                    ]
                ),
                _VALUE,
            ).map("=".join),
        ),
        max_size=4,
    ),
)
def test_random_set_values(scenario: str, pairs: list[str]) -> None:
    from marl.core import registry
    from marl.core.config import parse_sets

    _concord_or_success(lambda: registry.scenario_config(scenario, parse_sets(pairs)))


_CHANNEL_ITEM = st.tuples(
    st.sampled_from(["drop", "delay", "bits", "budget", "crash", "seed", "dorp", ""]), _VALUE
).map("=".join)


@FUZZ
@given(spec=st.one_of(_NOISE, st.lists(_CHANNEL_ITEM, max_size=4).map(",".join)))
def test_random_channel_specs(spec: str) -> None:
    from comms.channel import ChannelSpec, parse_channel

    parsed = _concord_or_success(lambda: parse_channel(spec))
    if isinstance(parsed, ChannelSpec):  # what parses has one spelling that parses back to itself
        assert parse_channel(parsed.canonical()) == parsed


@st.composite
def _mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` with a few bytes replaced, inserted or cut off: near-misses of a real file."""
    raw = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(raw)))
        what = draw(st.sampled_from(["replace", "insert", "truncate"]))
        chunk = draw(st.binary(min_size=1, max_size=8))
        if what == "replace":
            raw[at : at + len(chunk)] = chunk
        elif what == "insert":
            raw[at:at] = chunk
        else:
            del raw[at:]
    return bytes(raw)


_HEADERS = st.builds(
    lambda h, w, rows: f"type octile\nheight {h}\nwidth {w}\nmap\n{rows}".encode(),
    st.sampled_from(["2", "0", "-3", "1000000000000", "x", "2.5"]),
    st.sampled_from(["3", "0", "1000000000000", "٣"]),
    st.lists(st.text(alphabet=".@RPGOTWx\x00\ufeff", max_size=5), max_size=4).map("\n".join),
)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=200), _HEADERS))
def test_random_bytes_as_map(raw: bytes) -> None:
    from scenarios.warehouse.layout import layout_from_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.map"
        path.write_bytes(raw)
        _concord_or_success(lambda: layout_from_file(str(path)))


@FUZZ
@given(raw=_mutated(SMALL_MAP.read_bytes()))
def test_mutated_real_map_parses_or_is_refused(raw: bytes) -> None:
    test_random_bytes_as_map.hypothesis.inner_test(raw)  # the same property on near-misses


def _report(raw: bytes) -> None:
    from marl.commands.report import build_report

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "records.csv").write_bytes(raw)
        _concord_or_success(lambda: build_report(tmp, formats=["md"], figures=False, reps=100))


@settings(FUZZ, max_examples=max(EXAMPLES // 2, 1))  # a report per example: slower
@given(raw=st.one_of(st.binary(max_size=300), _mutated(FIXTURE.read_bytes())))
def test_random_bytes_as_records(raw: bytes) -> None:
    _report(raw)


@FUZZ
@given(raw=st.binary(max_size=400))
def test_random_bytes_as_checkpoint(raw: bytes) -> None:
    from marl.training import load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.pt"
        path.write_bytes(raw)
        result = _concord_or_success(lambda: load_checkpoint(path))
        assert isinstance(result, ConcordError)  # random bytes are never a valid checkpoint
