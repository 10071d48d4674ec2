"""Report figures (matplotlib, Agg backend), each written atomically as PNG and PDF.

* :func:`kpi_vs_bytes` — a KPI against bytes per agent per step: one point per protocol (per
  method and channel setting), with 95 % t-interval error bars on both axes. Where on the
  bandwidth/quality trade-off each protocol sits.
* :func:`kpi_vs_drop` — a KPI against the channel's message drop probability, one line per
  (method, protocol): how gracefully coordination degrades on a lossy channel.
* :func:`learning_curves` — KPI against training env steps with a 95 % t band over seeds, from
  the ``train_env_steps`` / ``eval_<kpi>`` / ``train_<kpi>`` rows marl.training logs per update.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from marl.results import stats
from marl.results.aggregate import channel_label
from marl.results.io import atomic_write_bytes

__all__ = ["kpi_vs_bytes", "kpi_vs_drop", "learning_curves", "save_figure"]

_SIZE = (4.8, 3.4)  # inches: fits a README column; the PNG at 100 dpi stays well under 100 KB


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, directory: Path, stem: str, *, dpi: int = 100) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` atomically; returns their paths."""
    paths = []
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        # Fixed metadata keeps PDFs byte-stable across runs (no creation date).
        metadata = {"CreationDate": None} if ext == "pdf" else {"Software": None}
        fig.savefig(buf, format=ext, dpi=dpi, bbox_inches="tight", metadata=metadata)
        paths.append(atomic_write_bytes(directory / f"{stem}.{ext}", buf.getvalue()))
    _pyplot().close(fig)
    return paths


def _err(block: pd.DataFrame, est: str, low: str, high: str) -> np.ndarray | None:
    lo = (block[est] - block[low]).to_numpy(dtype=float)
    hi = (block[high] - block[est]).to_numpy(dtype=float)
    if np.all(np.isnan(lo)):
        return None
    return np.vstack([np.nan_to_num(lo), np.nan_to_num(hi)])


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in text)


def kpi_vs_bytes(summary: pd.DataFrame, scenario: str, metric: str, goal: str, directory: Path) -> list[Path]:
    """KPI (y) against bytes per agent per step (x); cells without a channel sit at x = 0."""
    block = summary[(summary["scenario"] == scenario) & (summary["metric"] == metric)].copy()
    if block.empty:
        return []
    block["x"] = block["bytes_per_agent_step"].fillna(0.0)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=_SIZE)
    markers = "osD^vP*X"
    for i, ((method, channel), sub) in enumerate(block.groupby(["method", "channel"], sort=False)):
        xerr = _err(sub.assign(b=sub["x"]), "b", "bytes_per_agent_step_low", "bytes_per_agent_step_high")
        yerr = _err(sub, "mean", "ci_low", "ci_high")
        ax.errorbar(
            sub["x"],
            sub["mean"],
            xerr=xerr,
            yerr=yerr,
            fmt=markers[i % len(markers)],
            capsize=3,
            label=f"{method}, {channel_label(channel)}",
        )
        for _, r in sub.iterrows():
            ax.annotate(str(r["protocol"]), (r["x"], r["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    return _finish(fig, ax, scenario, metric, goal, "bytes per agent per step", "bandwidth", directory, "bytes")


def _finish(
    fig: Any,
    ax: Any,
    scenario: str,
    metric: str,
    goal: str,
    xlabel: str,
    against: str,
    directory: Path,
    suffix: str,
) -> list[Path]:
    """Labels, grid and legend shared by the KPI-against-X figures; saves PNG and PDF."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} ({'lower' if goal == 'min' else 'higher'} is better)")
    ax.set_title(f"{scenario}: {metric} vs {against}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, directory, f"{_slug(scenario)}_{_slug(metric)}_vs_{suffix}")


def kpi_vs_drop(summary: pd.DataFrame, scenario: str, metric: str, goal: str, directory: Path) -> list[Path]:
    """KPI against drop probability, one line per (method, protocol); needs ≥ 2 drop values.

    A series measured at one drop value only (a non-talking baseline, protocol none) is drawn as
    a dashed horizontal reference line with its 95 % band. Points are dodged sideways a little
    so that error bars at the same drop value stay readable.
    """
    block = summary[(summary["scenario"] == scenario) & (summary["metric"] == metric)]
    if block["drop"].nunique() < 2:
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=_SIZE)
    series = list(block.groupby(["method", "protocol"], sort=False))
    lines = [(key, sub) for key, sub in series if sub["drop"].nunique() > 1]
    span = float(block["drop"].max() - block["drop"].min())
    colours = {key: f"C{i % 10}" for i, (key, _) in enumerate(series)}
    for i, ((method, protocol), sub) in enumerate(lines):
        sub = sub.sort_values("drop")
        dodge = (i - (len(lines) - 1) / 2) * 0.012 * span
        ax.errorbar(
            sub["drop"] + dodge,
            sub["mean"],
            yerr=_err(sub, "mean", "ci_low", "ci_high"),
            marker="o",
            capsize=3,
            color=colours[(method, protocol)],
            label=f"{method}, {protocol}",
        )
    for (method, protocol), sub in series:
        if sub["drop"].nunique() > 1:
            continue
        row, colour = sub.iloc[0], colours[(method, protocol)]
        ax.axhline(row["mean"], linestyle="--", linewidth=1, color=colour, label=f"{method}, {protocol} (no messages)")
        if np.isfinite(row["ci_low"]):
            ax.axhspan(row["ci_low"], row["ci_high"], alpha=0.07, color=colour)
    return _finish(fig, ax, scenario, metric, goal, "message drop probability", "message loss", directory, "drop")


def training_curves(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows (GROUP..., seed, step, value): the KPI logged during training against env steps.

    marl.training logs, per update ``u`` (in the episode column), ``train_env_steps`` and
    ``train_<kpi>`` (training episodes finished in that update) and, at periodic evaluations,
    ``eval_<kpi>``. Periodic evaluations are preferred (they are what the final table measures);
    training-episode KPIs are the fallback. Runs without training rows give an empty frame.
    """
    steps = frame[frame["metric"] == "train_env_steps"][["run_id", "episode", "value"]]
    if steps.empty:
        return pd.DataFrame()
    steps = steps.rename(columns={"value": "step"})
    for name in (f"eval_{metric}", f"train_{metric}"):
        kpi = frame[frame["metric"] == name]
        if not kpi.empty:
            return kpi.merge(steps, on=["run_id", "episode"], how="inner")
    return pd.DataFrame()


def learning_curves(frame: pd.DataFrame, scenario: str, metric: str, goal: str, directory: Path) -> list[Path]:
    """Mean KPI over seeds against training step, with a 95 % t band (n/a band with one seed)."""
    curves = training_curves(frame[frame["scenario"] == scenario], metric)
    if curves.empty or curves["step"].nunique() < 2:
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=_SIZE)
    for (method, protocol, channel), sub in curves.groupby(["method", "protocol", "channel"], sort=False):
        seeds = sub.groupby(["seed", "step"])["value"].mean().reset_index()
        xs, mean, low, high = [], [], [], []
        for step, at in seeds.groupby("step"):
            interval = stats.t_interval(at["value"].to_numpy())
            xs.append(step)
            mean.append(interval.estimate)
            low.append(interval.low)
            high.append(interval.high)
        line = ax.plot(xs, mean, label=f"{method}, {protocol}, {channel_label(channel)}")[0]
        if np.any(np.isfinite(low)):
            ax.fill_between(xs, low, high, alpha=0.2, color=line.get_color())
    ax.set_xlabel("training environment steps")
    ax.set_ylabel(f"{metric} ({'lower' if goal == 'min' else 'higher'} is better)")
    ax.set_title(f"{scenario}: learning curves (95% t band over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, directory, f"{_slug(scenario)}_{_slug(metric)}_learning")


def figure_names(paths: Sequence[Path], base: Path) -> list[str]:
    return [str(p.relative_to(base)) for p in paths if p.suffix == ".png"]
