"""Load a results directory and aggregate it per scenario, method, protocol and channel setting.

The unit of replication is the seed: the episodes of one seed are averaged first (they share
one controller or trained policy), then seeds are summarised with

* the mean and its 95 % Student-t interval (n − 1 degrees of freedom, n = real number of seeds);
* the IQM with a 95 % stratified-bootstrap percentile interval — from 5 seeds on
  (:data:`marl.results.stats.IQM_CI_MIN_RUNS`); below that the interval is n/a (a bootstrap of
  2–4 seeds only restates their spread), the IQM itself is kept;
* the channel's cost beside it: bytes per agent per step and delivery rate (mean over seeds).

With fewer than two seeds no interval exists: it is shown as n/a and a note says so.

Which way is better comes from the scenario class (``registry.load(spec.entry_point).kpi_goals``);
the generic metrics the runner adds have fixed goals (:data:`GENERIC_GOALS`); any other metric is
taken as lower-is-better and the report notes that assumption.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from marl.core.errors import ConcordError, show, unknown
from marl.results import stats
from marl.results.cells import CELLS_DIR, collect_cells, read_plan, stale_cells
from marl.results.records import MANIFEST_DIR, RECORDS_FILE, SOURCE, load_records

__all__ = [
    "Results",
    "load_results",
    "Goals",
    "scenario_goals",
    "select_metrics",
    "per_seed",
    "summarize",
    "improvement",
    "Improvement",
    "kpi_metrics",
    "CHANNEL_TOTALS",
    "TRAINING_PREFIXES",
    "drop_rate",
    "channel_label",
    "COMMS_METRICS",
    "GENERIC_GOALS",
    "GROUP",
    "NO_PROTOCOL",
    "BASELINE_CONTEXT",
    "KEY",
    "nonfinite_seeds",
]

#: Channel statistics that runs with a protocol record; shown beside every KPI, not as KPIs.
COMMS_METRICS: tuple[str, ...] = ("bytes_per_agent_step", "delivery_rate")
#: Goals of metrics the runner itself adds (runner.run_episode) or the channel reports.
GENERIC_GOALS: dict[str, str] = {"return": "max", "bytes_per_agent_step": "min", "delivery_rate": "max"}
#: Bookkeeping metrics that are never a KPI row of their own.
BOOKKEEPING = frozenset({"env_steps", "step", "env_step", "update", "wall_seconds"})
#: Raw channel totals of an episode (comms.channel.Channel.totals): summarised by the two
#: normalised COMMS_METRICS beside each KPI, so they are not KPI tables of their own.
CHANNEL_TOTALS = frozenset(
    {
        "messages_sent",
        "messages_delivered",
        "messages_dropped",
        "messages_over_budget",
        "bytes_sent",
        "bytes_delivered",
        "channel_steps",
    }
)
#: Training logs (marl.training): ``train_*`` per update and ``eval_*`` periodic evaluations, with the
#: update number in the episode column. They feed learning curves; tables use the final
#: evaluation rows, which carry the plain KPI names. ``rank_failure_<r>`` rows (a rank died during
#: that update) and ``rank_rejoin_<r>`` rows (its replacement joined) are logged per update too.
TRAINING_PREFIXES: tuple[str, ...] = ("train_", "eval_", "rank_failure", "rank_rejoin")
#: The protocol that sends nothing (its result cannot depend on the channel).
NO_PROTOCOL = "none"
#: Appended to an improvement's context when protocol none's perfect-channel run stood in.
BASELINE_CONTEXT = f"({NO_PROTOCOL}: perfect-channel baseline)"
#: The columns a report groups by.
GROUP: tuple[str, ...] = ("scenario", "method", "protocol", "channel")
#: What identifies one measurement: a row of records.csv must be the only one with its KEY.
KEY: tuple[str, ...] = (*GROUP, "seed", "episode", "metric")


@dataclass
class Results:
    """What a results directory holds, ready for aggregation."""

    directory: Path
    frame: pd.DataFrame  #: long-format rows, COLUMNS
    manifests: list[dict[str, Any]]
    plan: dict[str, Any] | None = None  #: grid.json of a compare, when present
    failures: dict[str, str] = field(default_factory=dict)
    #: cell directories of an earlier compare into the same directory, not in grid.json: ignored
    stale: list[str] = field(default_factory=list)
    #: training-log rows a resumed run logged again: the earlier run's copies were dropped
    dropped_repeats: int = 0


def load_results(directory: str | Path) -> Results:
    """Read ``records.csv`` (or, for a compare, every finished cell of grid.json) plus manifests.

    Cell directories of an earlier compare into the same directory are not read; their keys are
    in ``Results.stale``.

    Raises a one-line ConcordError for a missing directory, a file given instead of one, an
    unreadable or malformed records file (naming file and line), a foreign schema, or a
    measurement recorded twice (:func:`_refuse_duplicates`).
    """
    root = Path(directory)
    if root.is_file():
        hint = f"; did you mean {show(str(root.parent))}?" if root.name == RECORDS_FILE else ""
        raise ConcordError(f"{show(str(root))} is a file; marl report takes the results directory{hint}")
    if not root.is_dir():
        raise ConcordError(f"results directory {show(str(root))} does not exist")
    plan = read_plan(root)
    failures: dict[str, str] = {}
    manifest_dirs: list[Path] = []
    stale: list[str] = []
    if (root / CELLS_DIR).is_dir():
        done, failures = collect_cells(root)  # the cells of grid.json only
        stale = stale_cells(root)
        frames = [load_records(d / RECORDS_FILE) for d in done if (d / RECORDS_FILE).exists()]
        manifest_dirs = [d / MANIFEST_DIR for d in done]
        if not frames:
            raise ConcordError(
                f"{root} has no finished cells yet ({len(failures)} failed); run 'marl compare' to fill it"
            )
        frame = pd.concat(frames, ignore_index=True)
    else:
        if not (root / RECORDS_FILE).exists():
            raise ConcordError(
                f"no {RECORDS_FILE} in {show(str(root))}; run 'marl compare' or 'marl run' into it first"
            )
        frame = load_records(root / RECORDS_FILE)
        manifest_dirs = [root / MANIFEST_DIR]
    if frame.empty:
        raise ConcordError(f"{root} holds no result rows yet")
    frame, repeats = _refuse_duplicates(frame)
    frame = frame.drop(columns=[SOURCE])
    manifests = []
    for mdir in manifest_dirs:
        for path in sorted(mdir.glob("*.json")):
            try:
                manifests.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                raise ConcordError(f"{show(str(path))} is not a readable JSON file") from None
    return Results(root, frame, manifests, plan, failures, stale, repeats)


def _refuse_duplicates(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """No measurement may count twice: two rows with one (scenario, method, protocol, channel,
    seed, episode, metric) are refused with both places named — which copy is right is the
    user's call (typically the same seed run twice into one directory).

    Training-log rows (``train_*``/``eval_*``, the update number in the episode column) are the
    one exception: a run resumed from a checkpoint logs again the updates after that
    checkpoint, so the later run's rows are kept and the earlier copies dropped (the report's
    notes say how many). Returns (frame, rows dropped).
    """
    training = frame["metric"].str.startswith(TRAINING_PREFIXES)
    dup = frame.duplicated(list(KEY), keep=False) & ~training
    if dup.any():
        first = frame[dup].iloc[0]
        same = frame[dup & (frame[list(KEY)] == first[list(KEY)]).all(axis=1)]
        where = " and ".join(f"{src} (run {run})" for src, run in zip(same[SOURCE][:2], same["run_id"][:2]))
        what = ", ".join(f"{k}={show(first[k])}" for k in KEY)
        raise ConcordError(
            f"{int(dup.sum())} rows measure the same thing twice, e.g. {what} at {where}; "
            "a seed must be counted once: remove one run's rows or report those runs from separate directories"
        )
    repeated = frame.duplicated(list(KEY), keep="last") & training
    return frame[~repeated].reset_index(drop=True), int(repeated.sum())


def nonfinite_seeds(frame: pd.DataFrame, metrics: Sequence[str]) -> list[str]:
    """Seeds left out of the statistics because their value of a reported metric is not finite
    (nan, inf: a KPI undefined for that episode, or a broken run), one description each, e.g.
    ``"traffic/grid4x4 max-pressure none perfect seed 2: delay=inf"``. The report lists them in
    its notes; :func:`summarize` counts only the finite seeds in ``n_seeds``."""
    seeds = per_seed(frame[frame["metric"].isin(list(metrics))])
    bad = seeds[~np.isfinite(seeds["value"].to_numpy(dtype=float))]
    return [
        f"{r.scenario} {r.method} {r.protocol} {channel_label(r.channel)} seed {r.seed}: {r.metric}={r.value}"
        for r in bad.itertuples(index=False)
    ]


@dataclass
class Goals:
    """Direction per metric for one scenario, plus notes about any assumption made."""

    scenario: str
    goals: dict[str, str]
    main_kpi: str = ""
    notes: list[str] = field(default_factory=list)

    def goal(self, metric: str) -> str:
        if metric in self.goals:
            return self.goals[metric]
        if metric in GENERIC_GOALS:
            return GENERIC_GOALS[metric]
        note = f"{self.scenario}: no goal known for metric '{metric}'; assumed lower is better"
        if note not in self.notes:
            self.notes.append(note)
        return "min"


def scenario_goals(scenario: str) -> Goals:
    """kpi_goals and main_kpi of the scenario's class, via the registry (no simulator is built)."""
    from marl.core import registry

    try:
        spec = registry.scenario_spec(scenario)
        cls = registry.load(spec.entry_point)
    except ConcordError:
        return Goals(scenario, {}, "", [f"scenario '{scenario}' is not registered; KPI goals unknown"])
    return Goals(scenario, dict(getattr(cls, "kpi_goals", {}) or {}), str(getattr(cls, "main_kpi", "") or ""))


def kpi_metrics(frame: pd.DataFrame) -> list[str]:
    """Metrics that are KPIs (not channel statistics or bookkeeping), in first-seen order."""
    seen = dict.fromkeys(frame["metric"])
    return [
        m
        for m in seen
        if m not in COMMS_METRICS
        and m not in BOOKKEEPING
        and m not in CHANNEL_TOTALS
        and not m.startswith(TRAINING_PREFIXES)
    ]


def select_metrics(frame: pd.DataFrame, requested: Sequence[str], main_kpis: Iterable[str] = ()) -> list[str]:
    """The requested metrics (each must exist: closest match otherwise), or every KPI, main first."""
    available = list(dict.fromkeys(frame["metric"]))
    if requested:
        for name in requested:
            if name not in available:
                raise unknown("metric", name, available)
        return list(dict.fromkeys(requested))
    kpis = kpi_metrics(frame)
    first = [m for m in dict.fromkeys(main_kpis) if m in kpis]
    return first + [m for m in kpis if m not in first]


def per_seed(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean over episodes for each (scenario, method, protocol, channel, seed, metric).

    A NaN episode makes its seed's mean NaN (pandas would skip it and average the rest, so one
    seed would silently rest on fewer episodes than the others); :func:`nonfinite_seeds` names it.
    """
    keys = [*GROUP, "seed", "metric"]
    grouped = frame.assign(_nan=frame["value"].isna()).groupby(keys, sort=False, dropna=False)
    means = grouped["value"].mean()
    means[grouped["_nan"].any()] = np.nan
    return means.reset_index()


def drop_rate(channel: str) -> float:
    """The message drop probability of a channel spec ("drop=0.3,delay=1" -> 0.3; "" -> 0.0)."""
    try:
        from comms.channel import parse_channel

        return float(parse_channel(channel).drop) if channel else 0.0
    except (ImportError, AttributeError):
        pass
    except ConcordError:  # a channel column no parser accepts: sort it last, do not fail the report
        return float("nan")
    match = re.search(r"(?:^|,)\s*drop\s*=\s*([0-9.eE+-]+)", channel)
    return float(match.group(1)) if match else 0.0


def channel_label(channel: str) -> str:
    return channel if channel else "perfect"


def _order(values: Iterable[str]) -> dict[str, int]:
    return {v: i for i, v in enumerate(dict.fromkeys(values))}


def summarize(
    frame: pd.DataFrame,
    metrics: Sequence[str],
    *,
    reps: int = stats.DEFAULT_REPS,
    confidence: float = 0.95,
    order: dict[str, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """One row per (scenario, method, protocol, channel, metric) with the statistics above.

    Columns: GROUP, metric, n_seeds, mean, ci_low, ci_high, iqm, iqm_low, iqm_high, and for the
    channel cost bytes_per_agent_step (+ _low/_high t-interval) and delivery_rate (NaN when the
    cell had no protocol in the loop). Rows are ordered by method and protocol as in ``order``
    (e.g. the compare plan's, as the user gave them), else as first seen, then by drop rate.
    """
    seeds = per_seed(frame)
    order = order or {}
    method_order = _order([*order.get("method", []), *frame["method"]])
    protocol_order = _order([*order.get("protocol", []), *frame["protocol"]])
    rows: list[dict[str, Any]] = []
    # Not dict(groupby): dict() would call GroupBy.keys, which is a list attribute, not a method.
    keyed = {key: sub for key, sub in seeds.groupby([*GROUP, "metric"], sort=False)}  # noqa: C416
    groups = list(dict.fromkeys(k[:4] for k in keyed))
    for group in groups:
        comms: dict[str, stats.Interval | None] = {}
        for cm in COMMS_METRICS:
            sub = keyed.get((*group, cm))
            comms[cm] = stats.t_interval(sub["value"].to_numpy(), confidence) if sub is not None else None
        for metric in metrics:
            sub = keyed.get((*group, metric))
            if sub is None:
                continue
            values = sub.sort_values("seed")["value"].to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            if values.size == 0:
                continue
            mean = stats.t_interval(values, confidence)
            robust = stats.iqm_interval(values, reps=reps, confidence=confidence)
            row: dict[str, Any] = dict(zip(GROUP, group))
            row.update(
                metric=metric,
                n_seeds=int(values.size),
                mean=mean.estimate,
                ci_low=mean.low,
                ci_high=mean.high,
                iqm=robust.estimate,
                iqm_low=robust.low,
                iqm_high=robust.high,
            )
            for cm, interval in comms.items():
                row[cm] = interval.estimate if interval else float("nan")
                row[f"{cm}_low"] = interval.low if interval else float("nan")
                row[f"{cm}_high"] = interval.high if interval else float("nan")
            row["drop"] = drop_rate(group[3])
            rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["_m"] = table["method"].map(method_order)
    table["_p"] = table["protocol"].map(protocol_order)
    table = table.sort_values(["scenario", "metric", "_m", "_p", "drop", "channel"], kind="stable")
    metric_rank = {m: i for i, m in enumerate(metrics)}
    table["_k"] = table["metric"].map(metric_rank)
    table = table.sort_values(["scenario", "_k"], kind="stable").drop(columns=["_m", "_p", "_k"])
    return table.reset_index(drop=True)


@dataclass
class Improvement:
    """P(A better than B) for one metric within one matching context."""

    scenario: str
    metric: str
    context: str  #: what was held fixed, e.g. "protocol=none, channel=perfect"
    a: str
    b: str
    probability: stats.Interval


def improvement(
    frame: pd.DataFrame,
    a: str,
    b: str,
    metrics: Sequence[str],
    goals: dict[str, Goals],
    *,
    reps: int = stats.DEFAULT_REPS,
) -> list[Improvement]:
    """P(A > B) (rliable's probability of improvement; ties count ½) per matching context.

    ``a`` and ``b`` name two methods (compared at equal protocol and channel) or two protocols
    (compared at equal method and channel). For lower-is-better metrics scores are negated, so
    the probability always reads "A is better than B".

    Protocol ``none`` sends nothing, so ``marl compare`` runs it once per seed on the perfect
    channel only. When one side is ``none`` and it has no rows at a channel setting where the
    other protocol has, that setting is compared against ``none``'s perfect-channel run of the
    same method; the context says so ("none: perfect-channel baseline").
    """
    methods = set(frame["method"])
    protocols = set(frame["protocol"])
    if a in methods and b in methods:
        varying, fixed = "method", ("protocol", "channel")
    elif a in protocols and b in protocols:
        varying, fixed = "protocol", ("method", "channel")
    else:
        allowed = sorted(methods | protocols)
        bad = b if (a in methods or a in protocols) else a
        raise unknown("method or protocol for --improvement", bad, allowed)
    seeds = per_seed(frame)
    out: list[Improvement] = []
    for metric in metrics:
        sub = seeds[seeds["metric"] == metric]
        for key, ctx in sub.groupby(["scenario", *fixed], sort=False):
            xa = ctx.loc[ctx[varying] == a, "value"].to_numpy(dtype=float)
            xb = ctx.loc[ctx[varying] == b, "value"].to_numpy(dtype=float)
            context = ", ".join(
                f"{name}={channel_label(v) if name == 'channel' else v}" for name, v in zip(fixed, key[1:])
            )
            if varying == "protocol" and (xa.size == 0) != (xb.size == 0) and NO_PROTOCOL in (a, b):
                missing = a if xa.size == 0 else b
                if missing == NO_PROTOCOL and key[2] != "":
                    base = sub[
                        (sub["scenario"] == key[0])
                        & (sub["method"] == key[1])
                        & (sub["protocol"] == NO_PROTOCOL)
                        & (sub["channel"] == "")
                    ]
                    values = base["value"].to_numpy(dtype=float)
                    if values.size:
                        xa, xb = (values, xb) if missing == a else (xa, values)
                        context += " " + BASELINE_CONTEXT
            if xa.size == 0 or xb.size == 0:
                continue
            sign = -1.0 if goals[key[0]].goal(metric) == "min" else 1.0
            prob = stats.probability_of_improvement_interval(sign * xa, sign * xb, reps=reps)
            out.append(Improvement(key[0], metric, context, a, b, prob))
    if not out:
        raise ConcordError(f"--improvement {a},{b}: no setting has results for both")
    return out
