"""The on-disk layout of a comparison (``marl compare``) and its merged view.

A comparison lives in one directory::

    results/NAME/
      grid.json                 the plan: scenario, methods, protocols, channels, seeds, --set,
                                and the cells skipped with their reason
      cells/<key>/cell.json     one cell's settings (checked on resume: a changed setting is an error)
      cells/<key>/records.csv   that cell's rows (the usual long format, marl.results.records)
      cells/<key>/manifests/    that cell's run manifest(s)
      cells/<key>/done.json     written atomically LAST: the cell is complete
      cells/<key>/error.txt     the traceback of a failed cell (no done.json)
      records.csv, manifests/   the merged view of every finished cell (what ``marl report`` reads)
      failures.json             failed cells and their one-line errors

Only the cells listed in grid.json make up the comparison: a later compare with other settings
into the same directory leaves the earlier cells on disk, but the merged view and ``marl report``
ignore them (see :func:`stale_cells`).

This module only reads and writes that data; running the cells is :mod:`marl.compare`'s job.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from marl.core.errors import ConcordError
from marl.results.io import atomic_write_json, atomic_write_text
from marl.results.records import COLUMNS, MANIFEST_DIR, RECORDS_FILE, read_rows

__all__ = [
    "CELLS_DIR",
    "DONE_FILE",
    "ERROR_FILE",
    "CELL_FILE",
    "GRID_FILE",
    "FAILURES_FILE",
    "read_plan",
    "plan_keys",
    "stale_cells",
    "collect_cells",
    "merge_cells",
]

CELLS_DIR = "cells"
DONE_FILE = "done.json"
ERROR_FILE = "error.txt"
CELL_FILE = "cell.json"
GRID_FILE = "grid.json"
FAILURES_FILE = "failures.json"


def read_plan(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The contents of ``grid.json`` (None when the directory has none)."""
    path = Path(out_dir) / GRID_FILE
    if not path.exists():
        return None
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise ConcordError(f"{path} is not a readable JSON file; rerun 'marl compare' into a new --out") from None
    if not isinstance(plan, dict):
        raise ConcordError(f"{path} does not hold a comparison plan (a JSON object)")
    return plan


def plan_keys(out_dir: str | os.PathLike[str]) -> list[str] | None:
    """The cell keys of the comparison recorded in ``grid.json`` (None without a grid.json)."""
    plan = read_plan(out_dir)
    keys = None if plan is None else plan.get("cells")
    return None if keys is None else [str(k) for k in keys]


def _cell_dirs(out_dir: str | os.PathLike[str]) -> list[Path]:
    root = Path(out_dir) / CELLS_DIR
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def stale_cells(out_dir: str | os.PathLike[str]) -> list[str]:
    """Cell directories left from an earlier compare into the same ``--out`` (keys not in
    grid.json): ignored by :func:`merge_cells` and by ``marl report``, never deleted."""
    keys = plan_keys(out_dir)
    if keys is None:
        return []
    wanted = set(keys)
    return [d.name for d in _cell_dirs(out_dir) if d.name not in wanted]


def collect_cells(out_dir: str | os.PathLike[str]) -> tuple[list[Path], dict[str, str]]:
    """Finished cell directories (sorted by key) and failed ones as {key: last error line}.

    With a grid.json only the cells of that plan count: directories of an earlier, different
    compare into the same directory (:func:`stale_cells`) are left out.
    """
    done: list[Path] = []
    failed: dict[str, str] = {}
    keys = plan_keys(out_dir)
    wanted = None if keys is None else set(keys)
    for cell_dir in _cell_dirs(out_dir):
        if wanted is not None and cell_dir.name not in wanted:
            continue
        if (cell_dir / DONE_FILE).exists():
            done.append(cell_dir)
        elif (cell_dir / ERROR_FILE).exists():
            text = (cell_dir / ERROR_FILE).read_text(encoding="utf-8", errors="replace")
            lines = [ln for ln in text.splitlines() if ln.strip()]
            failed[cell_dir.name] = lines[-1] if lines else "unknown error"
    return done, failed


def merge_cells(out_dir: str | os.PathLike[str]) -> tuple[int, int]:
    """Rebuild ``records.csv``, ``manifests/`` and ``failures.json`` from the plan's cells.

    Returns (finished cells, rows). Only finished cells of the plan in grid.json contribute,
    each exactly once; stale cells of an earlier compare (:func:`stale_cells`) and their
    manifests are left out of the merged view.
    """
    import csv
    import io

    out = Path(out_dir)
    done, failed = collect_cells(out)
    rows: list[list[str]] = []
    manifests: set[str] = set()
    for cell_dir in done:
        path = cell_dir / RECORDS_FILE
        if not path.exists():
            continue
        rows.extend(fields for _, fields in read_rows(path))  # checks the header and every line
        for manifest in sorted((cell_dir / MANIFEST_DIR).glob("*.json")):
            manifests.add(manifest.name)
            target = out / MANIFEST_DIR / manifest.name
            if not target.exists():
                atomic_write_text(target, manifest.read_text())
    for old in (out / MANIFEST_DIR).glob("*.json") if (out / MANIFEST_DIR).is_dir() else ():
        if old.name not in manifests:  # a manifest of a stale cell or a rerun attempt
            old.unlink()
    if rows or (out / RECORDS_FILE).exists():  # never leave rows of an earlier compare behind
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)
        atomic_write_text(out / RECORDS_FILE, buf.getvalue())
    atomic_write_json(out / FAILURES_FILE, failed)
    return len(done), len(rows)
