"""Sampling noise and verdicts: when does a measured difference between two models mean something?

Every comparison the book draws ("A beats B", "the gap narrows as data grows") goes through this
module, so the same rule decides it on every page and each branch has a test.

Two sources of noise are counted:

* the **test set**: an accuracy measured on ``n`` images has the binomial standard error
  ``sqrt(p (1 - p) / n)``;
* the **seed**: two trainings that differ only in their random seed end at different accuracies.
  With ``k`` seeds, the mean accuracy's standard error adds the spread between seeds,
  ``s / sqrt(k)`` (``s`` the sample standard deviation), to the test-set term.

A difference counts as real when it is at least ``z`` (default 2, roughly a 95% band) of its own
standard errors away from zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

Verdict = Literal["higher", "lower", "noise"]
TrendVerdict = Literal["agrees", "contradicts", "inconclusive"]
Z = 2.0  # standard errors a difference must clear to count as real


@dataclass(frozen=True)
class Estimate:
    """A measured quantity (an accuracy, or a difference of accuracies) with its standard error.

    ``values`` holds the per-seed measurements it was made from (empty for a derived estimate).
    """

    mean: float
    se: float
    values: tuple[float, ...] = ()

    @property
    def n_seeds(self) -> int:
        return len(self.values)

    def band(self, z: float = Z) -> tuple[float, float]:
        """The interval ``mean ± z * se``."""
        return self.mean - z * self.se, self.mean + z * self.se


def accuracy_se(acc: float, n_test: int) -> float:
    """Binomial standard error of an accuracy ``acc`` measured on ``n_test`` independent test images.

    At 0% or 100% the textbook formula gives 0, which would make any difference look significant;
    ``acc`` is kept at least half an image away from both ends.
    """
    if n_test < 1:
        raise ValueError(f"n_test must be a positive number of test images, got {n_test}")
    p = min(max(float(acc), 0.5 / n_test), 1 - 0.5 / n_test)
    return math.sqrt(p * (1 - p) / n_test)


def seed_estimate(accs: Sequence[float], n_test: int) -> Estimate:
    """The mean of per-seed test accuracies ``accs`` with a standard error that counts both noises.

    ``se**2 = s**2 / k + p (1 - p) / n_test`` with ``k = len(accs)`` seeds and ``s`` their sample
    standard deviation (0 for one seed, which then gets the test-set term alone). All seeds are
    scored on the same test images, so the test-set term is not divided by ``k``.
    """
    values = tuple(float(a) for a in accs)
    if not values:
        raise ValueError("seed_estimate needs at least one accuracy")
    mean = float(np.mean(values))
    seed_var = float(np.var(values, ddof=1)) if len(values) > 1 else 0.0
    se = math.sqrt(seed_var / len(values) + accuracy_se(mean, n_test) ** 2)
    return Estimate(mean, se, values)


def difference(a: Estimate, b: Estimate) -> Estimate:
    """``a - b`` with the standard error of a difference of two independent estimates."""
    return Estimate(a.mean - b.mean, math.hypot(a.se, b.se))


def noise_floor(a: Estimate, b: Estimate, z: float = Z) -> float:
    """The smallest ``|a - b|`` that :func:`compare` would call real."""
    return z * difference(a, b).se


def compare(a: Estimate, b: Estimate, z: float = Z) -> Verdict:
    """``"higher"`` if ``a`` is above ``b`` by at least ``z`` standard errors of the difference,
    ``"lower"`` if below by as much, ``"noise"`` otherwise."""
    d = difference(a, b)
    if abs(d.mean) < z * d.se:
        return "noise"
    return "higher" if d.mean > 0 else "lower"


@dataclass(frozen=True)
class Trend:
    """A weighted least-squares slope of ``y`` against ``log10(x)`` (or ``x``) and its verdict."""

    slope: float
    se: float
    verdict: TrendVerdict


def trend(xs: Sequence[float], ys: Sequence[Estimate], expected: int, z: float = Z, log_x: bool = True) -> Trend:
    """Does ``y`` move with ``x`` in the ``expected`` direction (+1 up, -1 down)?

    Fits ``y = a + slope * log10(x)`` by least squares weighted with ``1 / se**2`` and returns
    ``"agrees"`` when the slope has the expected sign and clears ``z`` of its standard errors,
    ``"contradicts"`` when it clears them with the opposite sign, ``"inconclusive"`` otherwise.
    At least three points are needed (two would fit a line exactly and leave nothing to test).
    """
    if expected not in (1, -1):
        raise ValueError(f"expected must be +1 or -1, got {expected}")
    if len(xs) != len(ys) or len(xs) < 3:
        raise ValueError(f"trend needs the same number (at least 3) of x and y values, got {len(xs)} and {len(ys)}")
    x = np.log10(np.asarray(xs, dtype=float)) if log_x else np.asarray(xs, dtype=float)
    y = np.array([e.mean for e in ys])
    w = 1.0 / np.maximum(np.array([e.se for e in ys]) ** 2, 1e-12)
    x_bar = float(np.sum(w * x) / np.sum(w))
    sxx = float(np.sum(w * (x - x_bar) ** 2))
    if sxx <= 0:
        raise ValueError("trend needs at least two different x values")
    slope = float(np.sum(w * (x - x_bar) * y) / sxx)
    se = math.sqrt(1.0 / sxx)
    if abs(slope) < z * se:
        verdict: TrendVerdict = "inconclusive"
    else:
        verdict = "agrees" if np.sign(slope) == expected else "contradicts"
    return Trend(slope, se, verdict)


def guessing_bound(n: int, num_classes: int, alpha: float = 0.01) -> float:
    """The accuracy on ``n`` images that uniform guessing among ``num_classes`` exceeds with probability
    at most ``alpha``, computed exactly from the binomial distribution."""
    if n < 1 or num_classes < 2 or not 0 < alpha < 1:
        raise ValueError(f"need n >= 1, num_classes >= 2 and 0 < alpha < 1; got {n}, {num_classes}, {alpha}")
    p = 1.0 / num_classes
    counts = np.arange(n + 1)
    log_pmf = (np.array([math.lgamma(n + 1) - math.lgamma(c + 1) - math.lgamma(n - c + 1) for c in counts])
               + counts * math.log(p) + (n - counts) * math.log1p(-p))
    at_least = np.cumsum(np.exp(log_pmf)[::-1])[::-1]  # at_least[c] = P(c or more right)
    fewest = int(np.nonzero(at_least <= alpha)[0][0])  # the fewest correct answers guessing reaches that rarely
    return (fewest - 1) / n  # exceeding this accuracy means at least `fewest` correct answers


def chance_level(labels: Sequence[int], num_classes: int, alpha: float = 0.01) -> float:
    """The accuracy a model that ignores its input can reach on ``labels``: the higher of the guessing
    bound (:func:`guessing_bound`) and the share of the most frequent class."""
    labels = np.asarray(labels, dtype=int)
    majority = np.bincount(labels, minlength=num_classes).max() / len(labels)
    return max(guessing_bound(len(labels), num_classes, alpha), float(majority))
