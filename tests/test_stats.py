"""marl.results.stats against scipy and rliable reference computations on fixed inputs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as sps

from marl.results import stats

rliable_metrics = pytest.importorskip("rliable.metrics", reason="rliable is the reference implementation")
rliable_library = pytest.importorskip("rliable.library", reason="rliable is the reference implementation")


def test_t_interval_matches_scipy_with_real_degrees_of_freedom():
    x = np.array([12.0, 15.5, 9.25, 14.0])
    got = stats.t_interval(x)
    low, high = sps.t.interval(0.95, df=len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert got.estimate == pytest.approx(x.mean())
    assert (got.low, got.high) == pytest.approx((low, high), rel=1e-12)
    assert got.n == 4
    # 3 degrees of freedom give a much wider interval than the normal approximation would.
    assert got.high - got.estimate > 1.96 * sps.sem(x) * 1.5


def test_t_interval_undefined_for_one_seed():
    got = stats.t_interval([3.0])
    assert got.estimate == 3.0 and not got.defined and np.isnan(got.low) and np.isnan(got.high)


def test_iqm_matches_rliable_on_runs_by_tasks():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(10, 3)) * np.array([1.0, 5.0, 0.1])
    assert stats.iqm(scores) == pytest.approx(float(rliable_metrics.aggregate_iqm(scores)), rel=1e-12)
    # An outlier moves the mean but not the IQM of [1..8, 1000].
    assert stats.iqm([1, 2, 3, 4, 5, 6, 7, 8, 1000]) == pytest.approx(
        sps.trim_mean([1, 2, 3, 4, 5, 6, 7, 8, 1000], 0.25)
    )


def test_stratified_bootstrap_ci_agrees_with_rliable():
    rng = np.random.default_rng(1)
    scores = rng.gamma(2.0, 1.0, size=(12, 2))
    low, high = stats.stratified_bootstrap_ci(scores, stats.iqm, reps=4000, seed=3)
    np.random.seed(0)  # rliable's StratifiedBootstrap draws from numpy's global generator
    _, intervals = rliable_library.get_interval_estimates(
        {"x": scores}, lambda s: np.array([rliable_metrics.aggregate_iqm(s)]), reps=4000
    )
    ref_low, ref_high = intervals["x"][:, 0]
    spread = scores.max() - scores.min()
    # Different random draws: the percentiles agree to Monte-Carlo error, a small share of the spread.
    assert low == pytest.approx(ref_low, abs=0.04 * spread)
    assert high == pytest.approx(ref_high, abs=0.04 * spread)
    assert low < stats.iqm(scores) < high


def test_bootstrap_is_stratified_by_task():
    # Runs vary only across tasks: a stratified resample keeps every task, so the mean never moves;
    # pooling runs across tasks (the bug this guards against) would give a wide interval.
    scores = np.tile(np.array([0.0, 10.0, 100.0]), (6, 1))
    low, high = stats.stratified_bootstrap_ci(scores, lambda s: float(np.mean(s)), reps=500)
    assert low == pytest.approx(110.0 / 3) and high == pytest.approx(110.0 / 3)


def test_bootstrap_deterministic_given_seed_and_undefined_for_one_run():
    x = [1.0, 4.0, 2.0, 8.0, 5.0]
    assert stats.stratified_bootstrap_ci(x, stats.iqm, seed=5) == stats.stratified_bootstrap_ci(x, stats.iqm, seed=5)
    assert all(np.isnan(v) for v in stats.stratified_bootstrap_ci([2.0], stats.iqm))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_probability_of_improvement_matches_rliable(seed):
    rng = np.random.default_rng(seed)
    # Integers make ties likely: they must count one half, as in the Mann-Whitney U statistic.
    x = rng.integers(0, 6, size=(7, 3)).astype(float)
    y = rng.integers(0, 6, size=(5, 3)).astype(float)
    expected = float(rliable_metrics.probability_of_improvement(x, y))
    assert stats.probability_of_improvement(x, y) == pytest.approx(expected, abs=1e-12)
    assert stats.probability_of_improvement(y, x) == pytest.approx(1.0 - expected, abs=1e-12)


def test_probability_of_improvement_edge_cases_and_interval():
    assert stats.probability_of_improvement([1, 2, 3], [1, 2, 3]) == 0.5
    separated = stats.probability_of_improvement_interval([5.0, 6.0, 7.0], [1.0, 2.0, 3.0], reps=300)
    assert (separated.estimate, separated.low, separated.high) == (1.0, 1.0, 1.0)
    mixed = stats.probability_of_improvement_interval([1.0, 4.0, 6.0, 2.0], [3.0, 2.5, 5.0, 0.0], reps=500)
    assert 0.0 <= mixed.low <= mixed.estimate <= mixed.high <= 1.0 and mixed.low < mixed.high
    with pytest.raises(ValueError):
        stats.probability_of_improvement(np.ones((3, 2)), np.ones((3, 3)))
    with pytest.raises(ValueError):
        stats.t_interval([1.0, float("nan")])


def test_iqm_interval_needs_five_runs_but_keeps_the_estimate():
    four = stats.iqm_interval([1.0, 2.0, 3.0, 10.0], reps=300)
    assert four.estimate == pytest.approx(2.5) and not four.defined and four.n == 4  # trims 1 and 10
    five = stats.iqm_interval([1.0, 2.0, 3.0, 4.0, 10.0], reps=300)
    assert five.estimate == pytest.approx(sps.trim_mean([1.0, 2.0, 3.0, 4.0, 10.0], 0.25))
    assert five.defined and five.low <= five.estimate <= five.high
    assert stats.iqm_interval([1.0, 2.0, 3.0], reps=300, min_runs=2).defined  # explicit override
