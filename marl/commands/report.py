"""``marl report``: statistics, tables and figures from a results directory.

Example::

    marl report results/demo                       # every KPI; md + csv + tex + figures
    marl report results/demo --metric delay --improvement neighbours,none --format md

Writes into ``results/NAME/report/`` (every file atomically): ``report.md``, ``summary.csv``,
``report.tex`` and ``figures/*.png|pdf``, then prints the Markdown. See marl/results/aggregate.py
for the statistics and marl/results/tables.py for the table layout.
"""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["command", "build_report"]

FORMATS = ("md", "csv", "tex")
#: Bootstrap replicates allowed: fewer make a noisy interval; more only cost memory (one array
#: of replicates x seeds per row) for no visible change in a 95 % interval.
MIN_REPS, MAX_REPS = 100, 100_000


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("directory")
@click.option("--format", "formats", default="md,csv,tex", help="Comma-separated table formats: md, csv, tex.")
@click.option("--metric", "metrics", multiple=True, help="KPI to report (repeatable); default: every KPI.")
@click.option(
    "--improvement",
    default=None,
    metavar="A,B",
    help="Probability that A beats B (two methods, or two protocols) per setting.",
)
@click.option("--figures/--no-figures", default=True, help="Write PNG and PDF figures.")
@click.option("--reps", type=int, default=2000, help="Bootstrap replicates for the IQM and P(A>B) intervals.")
@click.option("--quiet", is_flag=True, help="Do not print the Markdown report.")
def command(
    directory: str,
    formats: str,
    metrics: tuple[str, ...],
    improvement: str | None,
    figures: bool,
    reps: int,
    quiet: bool,
) -> None:
    """Aggregate DIRECTORY (from 'marl compare' or 'marl run') over seeds into tables and figures."""
    from marl.core.errors import ConfigError, show, unknown

    chosen = [f.strip() for f in formats.split(",") if f.strip()]
    for name in chosen:
        if name not in FORMATS:
            raise unknown("report format", name, FORMATS)
    if not MIN_REPS <= reps <= MAX_REPS:
        raise ConfigError(f"bad --reps {reps}; allowed: {MIN_REPS}..{MAX_REPS}")
    pair = None
    if improvement is not None:
        parts = [p.strip() for p in improvement.split(",")]
        if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
            raise ConfigError(f"bad --improvement {show(improvement)}; expected two different names A,B")
        pair = (parts[0], parts[1])
    markdown, written = build_report(
        directory, formats=chosen, metrics=list(metrics), improvement=pair, figures=figures, reps=reps
    )
    if not quiet:
        click.echo(markdown)
    out = Path(directory) / "report"
    click.echo(
        f"report: {len(written)} file(s) in {out} ({', '.join(sorted({p.suffix[1:] for p in written}))})", err=True
    )


def build_report(
    directory: str | Path,
    *,
    formats: list[str] | tuple[str, ...] = FORMATS,
    metrics: list[str] | None = None,
    improvement: tuple[str, str] | None = None,
    figures: bool = True,
    reps: int = 2000,
) -> tuple[str, list[Path]]:
    """Build the report of ``directory``; returns (Markdown text, files written)."""
    from marl.core.errors import ConcordError
    from marl.results import aggregate, plots, stats, tables
    from marl.results.io import atomic_write_text

    results = aggregate.load_results(directory)
    frame = results.frame
    goals = {s: aggregate.scenario_goals(s) for s in dict.fromkeys(frame["scenario"])}
    chosen = aggregate.select_metrics(frame, metrics or [], [g.main_kpi for g in goals.values()])
    plan = results.plan or {}
    order = {"method": plan.get("methods", []), "protocol": plan.get("protocols", [])}
    summary = aggregate.summarize(frame, chosen, reps=reps, order=order)
    if summary.empty:
        raise ConcordError(f"{results.directory}: no finite values for metric(s) {', '.join(chosen)}")
    improvements = (
        aggregate.improvement(frame, improvement[0], improvement[1], chosen, goals, reps=reps) if improvement else []
    )
    for scenario, metric in summary[["scenario", "metric"]].drop_duplicates().itertuples(index=False):
        goals[scenario].goal(metric)  # records a note for metrics without a known goal

    notes: list[str] = []
    nonfinite = aggregate.nonfinite_seeds(frame, chosen)
    if nonfinite:
        shown = "; ".join(nonfinite[:10]) + (f"; and {len(nonfinite) - 10} more" if len(nonfinite) > 10 else "")
        notes.append(
            f"{len(nonfinite)} seed value(s) are not finite (nan or inf) and were left out, so those "
            f"rows rest on fewer seeds (n_seeds counts only the finite ones): {shown}"
        )
    if results.dropped_repeats:
        notes.append(
            f"{results.dropped_repeats} training-log row(s) were logged twice (a run resumed from a "
            "checkpoint repeats the updates after it); the later run's rows were kept"
        )
    few = summary[summary["n_seeds"] < 2]
    if not few.empty:
        notes.append(
            f"{len(few)} row(s) rest on a single seed: no confidence interval exists (shown as n/a); "
            "run more seeds (--seeds K, K >= 2) for intervals"
        )
    few_iqm = summary[(summary["n_seeds"] >= 2) & (summary["n_seeds"] < stats.IQM_CI_MIN_RUNS)]
    if not few_iqm.empty:
        notes.append(
            f"{len(few_iqm)} row(s) rest on 2-{stats.IQM_CI_MIN_RUNS - 1} seeds: their IQM interval is n/a, "
            f"because a bootstrap of so few seeds only restates their spread and is no 95% CI "
            f"(it is given from {stats.IQM_CI_MIN_RUNS} seeds on); the IQM itself is shown"
            + (
                " and, below 4 seeds, trims nothing (25% of n < 1) and equals the mean"
                if (few_iqm["n_seeds"] < 4).any()
                else ""
            )
        )
    for goal in goals.values():
        notes.extend(goal.notes)
    skipped = plan.get("skipped", [])
    for reason in dict.fromkeys(s["reason"] for s in skipped):
        n = sum(s["reason"] == reason for s in skipped)
        notes.append(f"{n} combination(s) not run: {reason}")
    if results.stale:
        shown = ", ".join(results.stale[:10]) + (
            f" and {len(results.stale) - 10} more" if len(results.stale) > 10 else ""
        )
        notes.append(
            f"{len(results.stale)} cell director(ies) in cells/ are not in this comparison's grid.json "
            f"(left from an earlier compare with other settings) and were ignored: {shown}"
        )
    if any(aggregate.BASELINE_CONTEXT in imp.context for imp in improvements):
        notes.append(
            "protocol none sends nothing, so compare runs it on the perfect channel only; where the "
            "improvement table says 'none: perfect-channel baseline', the other protocol at that "
            "channel setting is compared with none's perfect-channel run of the same method"
        )
    if results.failures:
        notes.append(f"{len(results.failures)} cell(s) failed and are missing: {', '.join(sorted(results.failures))}")
    prov = tables.provenance(results.manifests, frame, plan)

    out = Path(directory) / "report"
    written: list[Path] = []
    figure_paths: list[Path] = []
    if figures:
        fig_dir = out / "figures"
        plot_metrics = metrics or [next((m for m in chosen if m == goals[s].main_kpi), chosen[0]) for s in goals]
        for scenario in goals:
            for metric in dict.fromkeys(plot_metrics):
                sense = goals[scenario].goal(metric)  # "min" or "max"
                figure_paths += plots.kpi_vs_bytes(summary, scenario, metric, sense, fig_dir)
                figure_paths += plots.kpi_vs_drop(summary, scenario, metric, sense, fig_dir)
                figure_paths += plots.learning_curves(results.frame, scenario, metric, sense, fig_dir)
    written += figure_paths
    title = f"Results: {Path(directory).resolve().name}"
    markdown = tables.markdown_report(
        summary,
        goals,
        title=title,
        improvements=improvements,
        notes=notes,
        prov=prov,
        figures=[str(p.relative_to(out)) for p in figure_paths if p.suffix == ".png"],
        # A hyper-parameter sweep (marl compare --algo-set): its settings ranked under each table.
        ranking=any("[" in str(m) for m in plan.get("methods", [])),
    )
    if "md" in formats:
        written.append(atomic_write_text(out / "report.md", markdown))
    if "csv" in formats:
        written.append(atomic_write_text(out / "summary.csv", tables.csv_summary(summary)))
    if "tex" in formats:
        written.append(
            atomic_write_text(
                out / "report.tex", tables.latex_report(summary, goals, improvements=improvements, prov=prov)
            )
        )
    return markdown, written
