"""What a training run writes besides checkpoints: records rows, the manifest, progress callbacks.

Rows use ``marl run``'s columns: ``method`` is the algorithm and ``protocol`` the protocol. Per
update ``u`` (in the ``episode`` column): ``train_<loss metric>``, ``train_env_steps``,
``train_steps_per_second``, ``train_env_time_fraction``, ``train_return`` and ``train_<main kpi>``
(means over the training episodes that ended during the update), ``rank_failure_<r>`` (rank ``r``,
its original MPI rank, died; value: the world size after), and after a
periodic evaluation ``eval_<kpi>``. The final evaluation writes one row per KPI per episode
(``episode`` = evaluation episode), exactly like ``marl run``. With ``--respawn`` a replacement
of rank ``r`` that joined during update ``u`` adds ``rank_rejoin_<r>`` (value: the world size
after, N again) to ``u``'s rows; both kinds of event (time, update, world size, seconds) are also
in the manifest's ``events``. Only rank 0 writes; every rank
logs under rank 0's run id and keeps the rows of its last :data:`HISTORY_UPDATES` updates, so that
when rank 0 dies (ULFM) the lowest survivor, rank 0 of the shrunk world, takes the writing over
(:meth:`TrainLog.take_over`): the dead writer's records stay up to the last update it logged, the
new writer adds its own rows of the updates after that one, so no update is lost or logged twice.
With root-free gossip the ranks are not in lockstep: the new writer may be updates ahead of the
dead one (or behind it), which is why it keeps more than one update.

On ``--resume`` into the directory of the run that wrote the checkpoint, that run's rows past
the checkpoint's update (and its final evaluation, which the resumed run replaces) are dropped
atomically first (:func:`drop_superseded_rows`), so the curve never holds two values for one
update and the directory never holds two final evaluations of one run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from marl.results.records import (
    COLUMNS,
    RECORDS_FILE,
    RecordWriter,
    Row,
    environment_info,
    now_iso,
    read_rows,
)
from marl.training.layout import TeamLayout
from marl.training.request import TrainPlan

__all__ = ["TrainLog", "drop_superseded_rows", "is_curve_metric"]

#: Updates of rows a non-writing rank keeps for :meth:`TrainLog.take_over`. Allreduce ranks are in
#: lockstep (the new writer is at most one update ahead of the dead one); push-sum gossip ranks
#: wait only for their one peer per round, so a rank can run a few rounds (about log2 of the world
#: size, plus one) ahead of a slow writer. 64 covers that with room; it bounds the memory.
HISTORY_UPDATES = 64


#: Metric prefixes of the rows that report a distributed event (one row per event).
EVENT_METRICS = ("rank_failure_", "rank_rejoin_")


def is_curve_metric(metric: str) -> bool:
    """Rows logged per update (the ``episode`` column is an update number)."""
    return metric.startswith(("train_", "eval_", "rank_failure", "rank_rejoin"))


def drop_superseded_rows(out_dir: Path, run_id: str, after_update: int) -> int:
    """Remove run ``run_id``'s curve rows of updates ``> after_update`` and its final-evaluation
    rows from ``out_dir/records.csv`` (atomically, under the records lock); returns how many."""
    if not (out_dir / RECORDS_FILE).exists():
        return 0
    run, episode, metric = (COLUMNS.index(c) for c in ("run_id", "episode", "metric"))

    def superseded(r: list[str]) -> bool:
        return r[run] == run_id and not (is_curve_metric(r[metric]) and int(r[episode]) <= after_update)

    return RecordWriter(out_dir).drop(superseded)


def checkpoint_run_id(out_dir: Path, resumed: dict[str, Any]) -> str | None:
    """The run that wrote ``resumed``: stored in it, or (older checkpoints) the run whose manifest
    names it as its last checkpoint."""
    if resumed.get("run_id"):
        return str(resumed["run_id"])
    target = Path(resumed["path"]).resolve()
    for manifest in sorted((out_dir / "manifests").glob("*.json")):
        try:
            last = json.loads(manifest.read_text()).get("last_checkpoint")
        except (OSError, ValueError):
            continue
        if last and Path(last).resolve() == target:
            return manifest.stem
    return None


class TrainLog:
    """Records rows, manifest and progress of one training run (writes only on rank 0)."""

    def __init__(
        self,
        plan: TrainPlan,
        run_id: str,
        world: Any,
        env: Any,
        layout: TeamLayout,
        update: int,
        env_steps: int,
        on_progress: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        request = plan.request
        is_root, world_size = (world.is_root, world.size) if world is not None else (True, 1)
        self.world, self.out_dir = world, plan.out_dir  #: world None: one process, always the writer
        self.request, self.run_id, self.on_progress = request, run_id, on_progress if is_root else None
        self.main_kpi: str = getattr(env, "main_kpi", "") or ""
        self.writer = RecordWriter(plan.out_dir) if is_root else None
        #: A non-writing rank's rows of its last HISTORY_UPDATES updates, each with the index of the
        #: event it reports in ``manifest["events"]`` (None for other rows); see take_over.
        self.unwritten: list[tuple[Row, int | None]] = []
        # A rank spawned by --respawn already holds the run's events (from the survivors): they are not new.
        known_events = list(world.events) if world is not None and getattr(world, "newcomer", False) else []
        self.manifest: dict[str, Any] = {
            "run_id": run_id,
            "command": "train",
            "request": {**asdict(request), "dist": asdict(request.dist) if request.dist is not None else None},
            "method": plan.method,
            "algo_config": asdict(plan.config),
            "scenario_config": asdict(env.config) if hasattr(env, "config") else None,
            "layout": layout.to_meta(),
            "resumed_from": None if plan.resumed is None else plan.resumed["path"],
            "start_time": now_iso(),
            "end_time": None,
            "updates_completed": update,
            "env_steps": env_steps,
            "events": known_events,
            **environment_info(world_size),
        }
        if self.writer is not None:
            if plan.resumed is not None:
                dead = checkpoint_run_id(plan.out_dir, plan.resumed)
                if dead is not None:
                    drop_superseded_rows(plan.out_dir, dead, int(plan.resumed["update"]))
            self.writer.write_manifest(run_id, self.manifest)

    def row(self, episode: int, metric: str, value: float) -> Row:
        r = self.request
        return Row(self.run_id, r.scenario, r.algo, r.protocol, r.channel, r.seed, episode, metric, float(value))

    def _append(self, rows: Iterable[Row], event_index: list[int | None] | None = None) -> None:
        """Write ``rows`` (the writer), or keep them for a take-over (``event_index``: per row, the
        index in ``manifest["events"]`` of the event it reports, or None)."""
        rows = list(rows)
        writer = self._writer()
        if writer is not None:
            writer.append(rows)
        elif rows:
            latest = max(r.episode for r in rows)
            kept = [(r, i) for r, i in self.unwritten if r.episode > latest - HISTORY_UPDATES]
            self.unwritten = kept + list(zip(rows, event_index or [None] * len(rows)))

    def _writer(self) -> RecordWriter | None:
        """The records writer, created here when this rank has just become rank 0."""
        if self.writer is None and self.world is not None and self.world.is_root:
            self.take_over()
        return self.writer

    def take_over(self) -> None:
        """Become the writer after rank 0 died, so that every update is in the records exactly once.

        The dead writer's rows stay up to the last update it logged, ``c`` (its appends are atomic
        and in update order, so updates 1..c are whole); this rank adds its kept rows of updates
        after ``c``. If the dead writer was ahead of this rank (gossip), its rows after this rank's
        last update are dropped: this rank logs those updates itself next. Failure and rejoin rows
        are matched by event, not update (gossip ranks log one event at different updates): the
        records hold the first ``m`` events of the run, this rank writes the ones after them."""
        self.writer = RecordWriter(self.out_dir)
        run, episode, metric = (COLUMNS.index(c) for c in ("run_id", "episode", "metric"))
        mine = self.unwritten
        last = max((r.episode for r, _ in mine), default=None)
        written = (
            [f for _, f in read_rows(self.writer.path) if f[run] == self.run_id] if self.writer.path.exists() else []
        )
        c = max((int(f[episode]) for f in written if f[metric] == "train_env_steps"), default=0)
        if last is not None and c > last:
            self.writer.drop(lambda f: f[run] == self.run_id and is_curve_metric(f[metric]) and int(f[episode]) > last)
            written = [f for f in written if not (is_curve_metric(f[metric]) and int(f[episode]) > last)]
            c = last
        m = sum(1 for f in written if f[metric].startswith(EVENT_METRICS))
        rows = [r for r, i in mine if (r.episode > c if i is None else i >= m)]
        first = min((r.episode for r, _ in mine), default=c + 1)
        if first > c + 1:  # cannot happen within HISTORY_UPDATES of skew; say so rather than hide it
            sys.stderr.write(f"marl: updates {c + 1}..{first - 1} of this run are missing from the records\n")
        self.writer.append(rows)
        self.unwritten = []
        sys.stderr.write(
            f"marl: rank {getattr(self.world, 'original_rank', '?')} writes this run's records from now on "
            f"(the writing rank died after logging update {c})\n"
        )

    def update_rows(
        self,
        update: int,
        metrics: dict[str, float],
        env_steps: int,
        sps: float,
        env_fraction: float,
        finished: list[tuple[float, dict[str, float]]],
        events: list[dict[str, Any]],
        last_return: float,
    ) -> None:
        """One update's curve rows; ``finished`` = (return, kpis) of training episodes that ended
        during it, ``last_return`` the return of the newest finished episode (for progress)."""
        if self.world is not None:  # tests: --inject-failure R:U:log (a writer that dies before logging U)
            self.world.maybe_inject_failure(update, "log")
        rows = [self.row(update, f"train_{k}", v) for k, v in metrics.items()]
        rows += [
            self.row(update, "train_env_steps", env_steps),
            self.row(update, "train_steps_per_second", sps),
            self.row(update, "train_env_time_fraction", env_fraction),
        ]
        if finished:
            rows.append(self.row(update, "train_return", float(np.mean([p[0] for p in finished]))))
            values = [p[1][self.main_kpi] for p in finished if self.main_kpi in p[1]]
            if self.main_kpi and values:
                rows.append(self.row(update, f"train_{self.main_kpi}", float(np.mean(values))))
        index: list[int | None] = [None] * len(rows)
        for event in events[len(self.manifest["events"]) :]:  # new distributed events only
            # One metric per rank: two ranks dying in one update are two rows, not a repeated key;
            # rank_failure_<r> or (--respawn) rank_rejoin_<r>, value: the world size after.
            metric = f"{event.get('event', 'rank_failure')}_{event.get('rank', -1)}"
            rows.append(self.row(update, metric, float(event.get("world_size_after", -1))))
            index.append(len(self.manifest["events"]))
            self.manifest["events"].append(event)
        self._append(rows, index)
        kpis = finished[-1][1] if finished else {}
        self.progress(
            phase="train",
            update=update,
            env_steps=env_steps,
            steps_per_second=sps,
            episode_return=last_return,
            kpi_value=kpis.get(self.main_kpi, float("nan")),
        )

    def eval_rows(self, update: int, results: list[dict[str, float]], env_steps: int) -> None:
        """Means of a periodic evaluation's KPIs as ``eval_<kpi>`` rows of ``update``."""
        if results:
            self._append(self.row(update, f"eval_{k}", float(np.mean([r[k] for r in results]))) for k in results[0])
            self._eval_progress(update, env_steps, results)

    def final_rows(self, update: int, results: list[dict[str, float]], env_steps: int) -> None:
        """The final evaluation, one row per KPI per episode (as ``marl run`` writes)."""
        self._append(self.row(e, metric, value) for e, kpis in enumerate(results) for metric, value in kpis.items())
        if results:
            self._eval_progress(update, env_steps, results)

    def _eval_progress(self, update: int, env_steps: int, results: list[dict[str, float]]) -> None:
        self.progress(
            phase="eval",
            update=update,
            env_steps=env_steps,
            eval_return=float(np.mean([k["return"] for k in results])),
            kpi_value=float(np.mean([k.get(self.main_kpi, np.nan) for k in results])),
        )

    def progress(self, **info: Any) -> None:
        if self.on_progress is not None:
            self.on_progress({"total_steps": self.request.steps, "kpi": self.main_kpi, **info})

    def save_manifest(self, **fields: Any) -> None:
        self.manifest.update(end_time=now_iso(), **fields)
        writer = self._writer()
        if writer is not None:
            writer.write_manifest(self.run_id, self.manifest)
