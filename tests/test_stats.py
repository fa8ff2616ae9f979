"""vitcourse.stats: every branch of the rules that decide the book's verdicts, against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from vitcourse import stats
from vitcourse.stats import Estimate


def test_accuracy_se_is_the_binomial_standard_error_and_never_zero():
    assert stats.accuracy_se(0.6, 4000) == pytest.approx(math.sqrt(0.24 / 4000))
    # Simulated: the spread of accuracies of a p = 0.7 model on 500 images.
    rng = np.random.default_rng(0)
    simulated = rng.binomial(500, 0.7, size=200_000) / 500
    assert stats.accuracy_se(0.7, 500) == pytest.approx(simulated.std(), rel=0.01)
    assert stats.accuracy_se(1.0, 100) > 0 and stats.accuracy_se(0.0, 100) > 0
    with pytest.raises(ValueError):
        stats.accuracy_se(0.5, 0)


def test_one_seed_gets_the_test_set_term_alone():
    e = stats.seed_estimate([0.8], 1000)
    assert e.mean == 0.8 and e.n_seeds == 1
    assert e.se == pytest.approx(stats.accuracy_se(0.8, 1000))


def test_seeds_add_their_spread_to_the_standard_error():
    accs = [0.70, 0.76, 0.82]
    e = stats.seed_estimate(accs, 1000)
    expected = math.sqrt(np.var(accs, ddof=1) / 3 + 0.76 * 0.24 / 1000)
    assert e.mean == pytest.approx(0.76) and e.se == pytest.approx(expected)
    # Identical seeds: nothing is added.
    assert stats.seed_estimate([0.5] * 3, 1000).se == pytest.approx(stats.accuracy_se(0.5, 1000))
    with pytest.raises(ValueError):
        stats.seed_estimate([], 1000)


def test_difference_and_band():
    d = stats.difference(Estimate(0.9, 0.03), Estimate(0.5, 0.04))
    assert d.mean == pytest.approx(0.4) and d.se == pytest.approx(0.05)
    assert d.band() == pytest.approx((0.3, 0.5))
    assert stats.noise_floor(Estimate(0.9, 0.03), Estimate(0.5, 0.04)) == pytest.approx(0.1)


@pytest.mark.parametrize("a, b, verdict", [
    (0.80, 0.70, "higher"),   # 10 points, floor 2 * sqrt(2) * 1 point
    (0.70, 0.80, "lower"),
    (0.80, 0.79, "noise"),
    (0.79, 0.80, "noise"),
])
def test_compare_every_branch(a, b, verdict):
    assert stats.compare(Estimate(a, 0.01), Estimate(b, 0.01)) == verdict


def test_compare_counts_seed_spread():
    # Same means; tight seeds are a real 4-point gap, widely spread seeds are not.
    tight = stats.compare(stats.seed_estimate([0.80, 0.81, 0.82], 10_000), stats.seed_estimate([0.76, 0.77, 0.78], 10_000))
    loose = stats.compare(stats.seed_estimate([0.70, 0.81, 0.92], 10_000), stats.seed_estimate([0.66, 0.77, 0.88], 10_000))
    assert (tight, loose) == ("higher", "noise")


def _line(xs, slope, se=0.01):
    return [Estimate(0.5 + slope * math.log10(x), se) for x in xs]


@pytest.mark.parametrize("slope, expected, verdict", [
    (0.10, 1, "agrees"),
    (-0.10, 1, "contradicts"),
    (-0.10, -1, "agrees"),
    (0.10, -1, "contradicts"),
    (0.0, 1, "inconclusive"),
    (0.0, -1, "inconclusive"),
])
def test_trend_every_branch(slope, expected, verdict):
    xs = [500, 1000, 2000, 4000]
    t = stats.trend(xs, _line(xs, slope), expected)
    assert t.verdict == verdict
    assert t.slope == pytest.approx(slope, abs=1e-9)


def test_trend_slope_and_se_match_weighted_least_squares():
    xs = [1, 2, 3, 4]
    ys = [Estimate(m, s) for m, s in [(0.1, 0.02), (0.25, 0.05), (0.28, 0.02), (0.41, 0.04)]]
    t = stats.trend(xs, ys, expected=1, log_x=False)
    x = np.array(xs, float)
    y = np.array([e.mean for e in ys])
    w = np.diag([1 / e.se ** 2 for e in ys])
    design = np.stack([np.ones(4), x], 1)
    cov = np.linalg.inv(design.T @ w @ design)
    beta = cov @ design.T @ w @ y
    assert t.slope == pytest.approx(beta[1]) and t.se == pytest.approx(math.sqrt(cov[1, 1]))


def test_trend_a_noisy_rise_is_inconclusive():
    xs = [500, 1000, 2000, 4000]
    assert stats.trend(xs, _line(xs, 0.02, se=0.05), expected=1).verdict == "inconclusive"


def test_trend_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError):
        stats.trend([1, 2], _line([1, 2], 0.1), 1)
    with pytest.raises(ValueError):
        stats.trend([5, 5, 5], _line([5, 5, 5], 0.1), 1)
    with pytest.raises(ValueError):
        stats.trend([1, 2, 3], _line([1, 2, 3], 0.1), 0)


@pytest.mark.parametrize("n, k", [(250, 10), (1000, 10), (97, 3), (40, 2)])
def test_guessing_bound_matches_scipy(n, k):
    bound = stats.guessing_bound(n, k)
    fewest = round(bound * n) + 1
    assert sps.binom.sf(fewest - 1, n, 1 / k) <= 0.01 < sps.binom.sf(fewest - 2, n, 1 / k)


def test_chance_level_is_the_majority_share_when_classes_are_unbalanced():
    labels = [0] * 80 + [1] * 10 + [2] * 10
    assert stats.chance_level(labels, 3) == pytest.approx(0.8)
    balanced = list(range(10)) * 100
    assert stats.chance_level(balanced, 10) == pytest.approx(stats.guessing_bound(1000, 10))
    with pytest.raises(ValueError):
        stats.guessing_bound(100, 1)
