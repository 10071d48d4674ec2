"""Render aggregated results as Markdown, CSV and LaTeX (booktabs) tables.

One table per (scenario, KPI). Rows are (method, protocol, channel setting); columns are the
number of seeds, the mean with its 95 % t-interval, the IQM with its 95 % stratified-bootstrap
interval, and the channel cost beside the KPI (bytes per agent per step, delivery rate). The best
value of each column is bold — lowest or highest according to the KPI's goal; lowest bytes and
highest delivery rate for the channel columns. Intervals that do not exist read n/a: the mean's
with one seed, the IQM's with fewer than 5 seeds (marl.results.stats.IQM_CI_MIN_RUNS).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from marl.results.aggregate import GROUP, Goals, Improvement, channel_label
from marl.results.stats import IQM_CI_MIN_RUNS

__all__ = ["fmt", "Provenance", "provenance", "markdown_report", "latex_report", "csv_summary", "ranked"]

_COLUMNS = (
    "method",
    "protocol",
    "channel",
    "seeds",
    "mean [95% CI]",
    "IQM [95% CI]",
    "bytes/agent/step",
    "delivery rate",
)


def fmt(x: float) -> str:
    """Four significant digits; plain integers between 10^4 and 10^7 rather than 1.234e+04."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if 1e4 <= abs(x) < 1e7:
        return f"{x:.0f}"
    return f"{x:.4g}"


def _interval(est: float, low: float, high: float) -> str:
    if math.isnan(low) or math.isnan(high):
        return f"{fmt(est)} [n/a]"
    return f"{fmt(est)} [{fmt(low)}, {fmt(high)}]"


def _best(values: pd.Series, goal: str) -> pd.Series:
    """Boolean mask of the best entries (ties all best); all False when nothing to compare."""
    finite = values.dropna()
    if finite.empty:
        return pd.Series(False, index=values.index)
    target = finite.min() if goal == "min" else finite.max()
    return values.apply(lambda v: bool(not pd.isna(v) and math.isclose(v, target, rel_tol=1e-12, abs_tol=0.0)))


@dataclass
class _Cell:
    text: str
    bold: bool = False


def _table_cells(block: pd.DataFrame, goal: str) -> list[list[_Cell]]:
    best_mean = _best(block["mean"], goal)
    best_iqm = _best(block["iqm"], goal)
    best_bytes = _best(block["bytes_per_agent_step"], "min")
    best_delivery = _best(block["delivery_rate"], "max")
    rows = []
    for idx, r in block.iterrows():
        rows.append(
            [
                _Cell(str(r["method"])),
                _Cell(str(r["protocol"])),
                _Cell(channel_label(str(r["channel"]))),
                _Cell(str(int(r["n_seeds"]))),
                _Cell(_interval(r["mean"], r["ci_low"], r["ci_high"]), bool(best_mean[idx])),
                _Cell(_interval(r["iqm"], r["iqm_low"], r["iqm_high"]), bool(best_iqm[idx])),
                _Cell(fmt(r["bytes_per_agent_step"]), bool(best_bytes[idx])),
                _Cell(fmt(r["delivery_rate"]), bool(best_delivery[idx])),
            ]
        )
    return rows


def _blocks(summary: pd.DataFrame):
    for (scenario, metric), block in summary.groupby(["scenario", "metric"], sort=False):
        yield str(scenario), str(metric), block


@dataclass
class Provenance:
    """Where the numbers come from, gathered from the run manifests."""

    commits: list[str] = field(default_factory=list)
    versions: dict[str, list[str]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)
    world_sizes: list[int] = field(default_factory=list)
    runs: int = 0
    python: list[str] = field(default_factory=list)
    span: tuple[str, str] | None = None
    compare_ranks: int = 1  #: MPI ranks the compare spread its cells over (grid.json)

    def lines(self) -> list[str]:
        versions = ", ".join(f"{k} {'/'.join(v)}" for k, v in sorted(self.versions.items()))
        out = [
            f"commit: {', '.join(self.commits) or 'unknown'}",
            f"runs: {self.runs}; seeds: {', '.join(map(str, self.seeds))}; "
            f"world size: {', '.join(map(str, self.world_sizes)) or '1'}"
            + (f"; cells spread over {self.compare_ranks} MPI ranks" if self.compare_ranks > 1 else ""),
            f"python {', '.join(self.python) or '?'}; {versions or 'package versions unknown'}",
        ]
        if self.span:
            out.append(f"runs started {self.span[0]} — last finished {self.span[1]}")
        return out


def provenance(
    manifests: Sequence[dict[str, Any]], frame: pd.DataFrame, plan: dict[str, Any] | None = None
) -> Provenance:
    prov = Provenance(runs=len(manifests) or frame["run_id"].nunique())
    prov.compare_ranks = int((plan or {}).get("world_size", 1) or 1)
    prov.commits = sorted({str(m.get("git_commit")) for m in manifests if m.get("git_commit")})
    versions: dict[str, set[str]] = {}
    for m in manifests:
        for name, version in (m.get("versions") or {}).items():
            versions.setdefault(name, set()).add(str(version))
    prov.versions = {k: sorted(v) for k, v in versions.items()}
    prov.seeds = sorted({int(s) for s in frame["seed"]})
    prov.world_sizes = sorted({int(m.get("world_size", 1) or 1) for m in manifests})
    prov.python = sorted({str(m["python"]) for m in manifests if m.get("python")})
    starts = sorted(str(m["start_time"]) for m in manifests if m.get("start_time"))
    ends = sorted(str(m["end_time"]) for m in manifests if m.get("end_time"))
    if starts and ends:
        prov.span = (starts[0], ends[-1])
    return prov


def _goal_word(goal: str) -> str:
    return "lower is better" if goal == "min" else "higher is better"


def markdown_report(
    summary: pd.DataFrame,
    goals: dict[str, Goals],
    *,
    title: str,
    improvements: Sequence[Improvement] = (),
    notes: Sequence[str] = (),
    prov: Provenance | None = None,
    figures: Sequence[str] = (),
    ranking: bool = False,
) -> str:
    """The Markdown report; ``ranking`` adds, under each table, its rows ranked best first (for
    hyper-parameter sweeps: which setting won, and which ones the intervals cannot tell apart)."""
    out = [f"# {title}", ""]
    for scenario, metric, block in _blocks(summary):
        goal = goals[scenario].goal(metric)
        out += [f"## {scenario} — {metric} ({_goal_word(goal)})", ""]
        out.append("| " + " | ".join(_COLUMNS) + " |")
        out.append("|" + "|".join(["---"] * 3 + ["---:"] * 5) + "|")
        for cells in _table_cells(block, goal):
            out.append("| " + " | ".join(f"**{c.text}**" if c.bold else c.text for c in cells) + " |")
        out.append("")
        if ranking and len(block) > 1:
            out += _ranking_md(block, goal)
    if improvements:
        out += ["## Probability of improvement", ""]
        out.append("| scenario | metric | held fixed | P(A better than B) [95% CI] |")
        out.append("|---|---|---|---:|")
        for imp in improvements:
            p = imp.probability
            out.append(
                f"| {imp.scenario} | {imp.metric} | {imp.context} | "
                f"P({imp.a} > {imp.b}) = {_interval(p.estimate, p.low, p.high)} |"
            )
        out.append("")
    if figures:
        out += ["## Figures", ""] + [f"- {name}" for name in figures] + [""]
    out += _notes_md(notes)
    if prov is not None:
        out += ["---", ""] + [f"<sub>{line}</sub>  " for line in prov.lines()] + [""]
    return "\n".join(out)


def ranked(block: pd.DataFrame, goal: str) -> pd.DataFrame:
    """``block``'s rows best first by mean, with ``rank`` (1 = best) and ``tied_with_best``: the
    row's 95% interval overlaps the best row's (the seeds cannot tell them apart)."""
    order = block.sort_values("mean", ascending=goal == "min", na_position="last").copy()
    best = order.iloc[0]
    overlap = (order["ci_low"] <= best["ci_high"]) & (order["ci_high"] >= best["ci_low"])
    order["rank"] = range(1, len(order) + 1)
    order["tied_with_best"] = overlap | order["ci_low"].isna() | (order["rank"] == 1)
    return order


def _ranking_md(block: pd.DataFrame, goal: str) -> list[str]:
    out = ["Ranked by mean; '=' marks settings whose 95% interval overlaps the best one's.", ""]
    out += ["| rank | method | protocol | channel | mean [95% CI] | seeds |", "|---:|---|---|---|---:|---:|"]
    for _, r in ranked(block, goal).iterrows():
        mark = "=" if r["tied_with_best"] and r["rank"] > 1 else ""
        out.append(
            f"| {int(r['rank'])}{mark} | {r['method']} | {r['protocol']} | {channel_label(str(r['channel']))} | "
            f"{_interval(r['mean'], r['ci_low'], r['ci_high'])} | {int(r['n_seeds'])} |"
        )
    return [*out, ""]


def _notes_md(notes: Sequence[str]) -> list[str]:
    base = [
        "Mean: over seeds (each seed's episodes averaged first) with a 95% Student-t interval; "
        "IQM: interquartile mean with a 95% stratified-bootstrap percentile interval "
        f"(from {IQM_CI_MIN_RUNS} seeds on; n/a below); "
        "bold: best in its column.",
    ]
    return ["**Notes.** " + " ".join(base), ""] + [f"- {n}" for n in notes] + ([""] if notes else [])


_TEX_ESCAPES = {
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\\": r"\textbackslash{}",
}


def tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)


def latex_report(
    summary: pd.DataFrame,
    goals: dict[str, Goals],
    *,
    improvements: Sequence[Improvement] = (),
    prov: Provenance | None = None,
) -> str:
    """One booktabs ``table`` per (scenario, KPI); needs ``\\usepackage{booktabs}``."""
    out = ["% Generated by marl report; needs \\usepackage{booktabs}", ""]
    for scenario, metric, block in _blocks(summary):
        goal = goals[scenario].goal(metric)
        out += [
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{{tex_escape(scenario)}: {tex_escape(metric)} ({_goal_word(goal)}); "
            r"mean with 95\% t-interval and IQM with 95\% stratified-bootstrap interval over seeds"
            rf" (n/a below {IQM_CI_MIN_RUNS} seeds); best in bold.}}",
            r"\begin{tabular}{lllrrrrr}",
            r"\toprule",
            " & ".join(tex_escape(c) for c in _COLUMNS) + r" \\",
            r"\midrule",
        ]
        for cells in _table_cells(block, goal):
            texts = [rf"\textbf{{{tex_escape(c.text)}}}" if c.bold else tex_escape(c.text) for c in cells]
            out.append(" & ".join(texts) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    if improvements:
        out += [
            r"\begin{table}[t]",
            r"\centering",
            r"\caption{Probability of improvement (rliable).}",
            r"\begin{tabular}{lllr}",
            r"\toprule",
            r"scenario & metric & held fixed & P(A $>$ B) \\",
            r"\midrule",
        ]
        for imp in improvements:
            p = imp.probability
            out.append(
                f"{tex_escape(imp.scenario)} & {tex_escape(imp.metric)} & {tex_escape(imp.context)} & "
                f"{tex_escape(f'P({imp.a} > {imp.b}) = ' + _interval(p.estimate, p.low, p.high))} \\\\"
            )
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    if prov is not None:
        out += [f"% {line}" for line in prov.lines()]
    return "\n".join(out) + "\n"


def csv_summary(summary: pd.DataFrame) -> str:
    """The full summary (every statistic, unrounded) as CSV."""
    buf = io.StringIO()
    columns = [*GROUP, "metric"] + [c for c in summary.columns if c not in (*GROUP, "metric")]
    summary[columns].to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()
