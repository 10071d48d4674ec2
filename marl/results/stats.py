"""Statistics for comparing methods over seeds: t-intervals, IQM with bootstrap CIs, P(X > Y).

Inputs are arrays of per-run scores. A *run* is one seed (its episodes are averaged first, so
episodes of one seed — which share one controller/policy instance — are not counted as
independent samples). Where a function takes a matrix it is ``scores[run, task]`` as in
rliable (Agarwal et al., "Deep RL at the Edge of the Statistical Precipice", NeurIPS 2021):
in Concord a task is a scenario, and a report cell usually has a single task.

* :func:`t_interval` — mean with a Student-t confidence interval using the real number of seeds
  (n − 1 degrees of freedom; a normal 1.96 would be far too narrow for 3–5 seeds).
* :func:`iqm` — interquartile mean: the mean of the middle 50 % of all scores
  (``scipy.stats.trim_mean(x, 0.25)``), robust to one outlying seed yet less noisy than a median.
* :func:`stratified_bootstrap_ci` — percentile bootstrap that resamples runs *within* each task
  (stratified), so every replicate keeps every task; the CI rliable reports for IQM.
* :func:`probability_of_improvement` — P(X > Y) + ½ P(X = Y) per task, averaged over tasks: the
  Mann–Whitney U statistic divided by n_x·n_y (rliable's definition).

Everything is numpy/scipy; rliable is only used by the tests, as a reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

__all__ = [
    "Interval",
    "t_interval",
    "iqm",
    "stratified_bootstrap_ci",
    "iqm_interval",
    "IQM_CI_MIN_RUNS",
    "probability_of_improvement",
    "probability_of_improvement_interval",
]

#: Fewest runs for which :func:`iqm_interval` reports its bootstrap interval. With 2–4 runs the
#: IQM trims nothing (25 % of n < 1) and the percentile bootstrap of so few values is no more
#: than their spread — its nominal 95 % coverage does not hold — so it is left undefined.
IQM_CI_MIN_RUNS = 5
#: Bootstrap replicates used by reports: enough for stable 2.5/97.5 % percentiles (±~1 % of the
#: spread between runs) while a 20-cell report stays well under a second.
DEFAULT_REPS = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate with a confidence interval; ``low``/``high`` are NaN when undefined."""

    estimate: float
    low: float
    high: float
    n: int  #: number of runs (seeds) behind the estimate

    @property
    def defined(self) -> bool:
        return bool(np.isfinite(self.low) and np.isfinite(self.high))


def _as_runs_by_tasks(scores: np.ndarray | list[float]) -> np.ndarray:
    """A 1-D array of run scores becomes a (runs, 1) matrix; NaNs are rejected."""
    array = np.asarray(scores, dtype=float)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"scores must be 1-D (runs) or 2-D (runs, tasks); got shape {array.shape}")
    if array.shape[0] == 0:
        raise ValueError("scores are empty")
    if not np.all(np.isfinite(array)):
        raise ValueError("scores contain NaN or infinite values")
    return array


def t_interval(values: np.ndarray | list[float], confidence: float = 0.95) -> Interval:
    """Mean of ``values`` (one per seed) with a two-sided Student-t interval.

    half-width = t_{(1+c)/2, n-1} · s / √n, with s the sample standard deviation (ddof=1).
    With fewer than two values the interval is undefined (NaN), never a zero-width lie.
    """
    x = _as_runs_by_tasks(values)[:, 0]
    n = x.size
    mean = float(np.mean(x))
    if n < 2:
        return Interval(mean, float("nan"), float("nan"), n)
    sem = float(np.std(x, ddof=1)) / np.sqrt(n)
    half = float(sps.t.ppf((1.0 + confidence) / 2.0, df=n - 1)) * sem
    return Interval(mean, float(mean - half), float(mean + half), n)


def iqm(scores: np.ndarray | list[float]) -> float:
    """Interquartile mean over all runs and tasks (25 % trimmed from each end)."""
    return float(sps.trim_mean(_as_runs_by_tasks(scores), proportiontocut=0.25, axis=None))


def stratified_bootstrap_ci(
    scores: np.ndarray | list[float],
    statistic: Callable[[np.ndarray], float],
    *,
    reps: int = DEFAULT_REPS,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic(scores)``, resampling runs within each task.

    Each replicate draws, independently for every task column, ``n_runs`` run indices with
    replacement (rliable's ``StratifiedBootstrap`` without task bootstrap). Returns (low, high);
    NaNs when there are fewer than two runs (a resample of one value says nothing).
    """
    matrix = _as_runs_by_tasks(scores)
    n_runs, n_tasks = matrix.shape
    if n_runs < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    # indices[r, i, t]: which run replicate r uses at position i of task t.
    indices = rng.integers(0, n_runs, size=(reps, n_runs, n_tasks))
    resampled = matrix[indices, np.arange(n_tasks)[None, None, :]]
    if statistic is iqm:  # vectorised fast path: one trim_mean over all replicates
        flat = resampled.reshape(reps, n_runs * n_tasks)
        values = np.asarray(sps.trim_mean(flat, proportiontocut=0.25, axis=1), dtype=float)
    else:
        values = np.array([statistic(resampled[r]) for r in range(reps)], dtype=float)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return float(low), float(high)


def iqm_interval(
    scores: np.ndarray | list[float],
    *,
    reps: int = DEFAULT_REPS,
    confidence: float = 0.95,
    seed: int = 0,
    min_runs: int | None = None,
) -> Interval:
    """IQM with its stratified bootstrap CI; the CI is NaN (undefined) below ``min_runs`` runs
    (default :data:`IQM_CI_MIN_RUNS`), the IQM itself is always given."""
    matrix = _as_runs_by_tasks(scores)
    estimate = iqm(matrix)
    if matrix.shape[0] < (IQM_CI_MIN_RUNS if min_runs is None else min_runs):
        return Interval(estimate, float("nan"), float("nan"), matrix.shape[0])
    low, high = stratified_bootstrap_ci(matrix, iqm, reps=reps, confidence=confidence, seed=seed)
    return Interval(estimate, low, high, matrix.shape[0])


def probability_of_improvement(scores_x: np.ndarray | list[float], scores_y: np.ndarray | list[float]) -> float:
    """P(X > Y) averaged over tasks, ties counting one half (rliable's definition).

    Higher scores are taken as better; for a KPI where lower is better pass negated scores.
    Per task this is U / (n_x · n_y) with U the Mann–Whitney statistic of X against Y.
    """
    x = _as_runs_by_tasks(scores_x)
    y = _as_runs_by_tasks(scores_y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"X has {x.shape[1]} tasks and Y {y.shape[1]}; they must match")
    per_task = []
    for task in range(x.shape[1]):
        a, b = x[:, task][:, None], y[:, task][None, :]
        # Direct pairwise count: the same number scipy's mannwhitneyu U gives, with no
        # special case for identical samples (which come out at exactly 0.5).
        per_task.append(float(np.mean((a > b) + 0.5 * (a == b))))
    return float(np.mean(per_task))


def probability_of_improvement_interval(
    scores_x: np.ndarray | list[float],
    scores_y: np.ndarray | list[float],
    *,
    reps: int = DEFAULT_REPS,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """P(X > Y) with a percentile CI from resampling X's and Y's runs independently per task."""
    x = _as_runs_by_tasks(scores_x)
    y = _as_runs_by_tasks(scores_y)
    estimate = probability_of_improvement(x, y)
    n = min(x.shape[0], y.shape[0])
    if n < 2:
        return Interval(estimate, float("nan"), float("nan"), n)
    rng = np.random.default_rng(seed)
    tasks = np.arange(x.shape[1])[None, :]
    values = np.empty(reps)
    for r in range(reps):
        xi = rng.integers(0, x.shape[0], size=x.shape)
        yi = rng.integers(0, y.shape[0], size=y.shape)
        values[r] = probability_of_improvement(x[xi, tasks], y[yi, tasks])
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return Interval(estimate, float(low), float(high), n)
