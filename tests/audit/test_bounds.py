"""The audit's bounds against computations made another way: scipy's exact binomial intervals, the theorem's
sums in exact integer arithmetic, and simulated mechanisms whose privacy is known."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy.stats import binomtest

from fl_dp_lightning.audit.bounds import (
    clopper_pearson,
    membership_lower_bound,
    one_run_lower_bound,
    one_run_p_value,
)


def direct_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Theorem 3.1 of Steinke, Nasr and Jagielski 2023 as stated, summed term by term in exact fractions."""
    q = Fraction(math.exp(epsilon)) / (1 + Fraction(math.exp(epsilon)))

    def pmf(j: int) -> Fraction:
        return math.comb(r, j) * q**j * (1 - q) ** (r - j)

    tail = sum((pmf(j) for j in range(v, r + 1)), Fraction(0))
    alpha, below = Fraction(0), Fraction(0)
    for i in range(1, v + 1):  # below = P[v - i <= Binomial(r, q) < v]
        below += pmf(v - i)
        alpha = max(alpha, below / i)
    return min(float(tail + 2 * m * Fraction(delta) * alpha), 1.0)


@pytest.mark.parametrize(("m", "r", "v"), [(1000, 100, 100), (1000, 100, 80), (200, 20, 17), (50, 10, 3)])
@pytest.mark.parametrize("epsilon", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("delta", [0.0, 1e-5, 1e-3])
def test_the_one_run_p_value_is_the_theorems_sum(m, r, v, epsilon, delta):
    assert one_run_p_value(m, r, v, epsilon, delta) == pytest.approx(direct_p_value(m, r, v, epsilon, delta), 1e-9)


@pytest.mark.parametrize(("r", "v"), [(100, 100), (100, 90), (100, 70), (20, 19), (1000, 600)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_without_delta_the_bound_is_the_logit_of_the_clopper_pearson_lower_limit(r, v, confidence):
    # one-sided at 1 - confidence is scipy's two-sided exact interval at 1 - 2 (1 - confidence)
    low = binomtest(v, r).proportion_ci(confidence_level=1 - 2 * (1 - confidence), method="exact").low
    expected = max(0.0, math.log(low / (1 - low)))
    assert one_run_lower_bound(1000, r, v, 0.0, confidence) == pytest.approx(expected, abs=1e-9)


def test_the_bound_is_the_largest_epsilon_rejected_and_grows_with_right_guesses():
    bounds = [one_run_lower_bound(1000, 100, v, 1e-5) for v in range(50, 101)]
    assert bounds == sorted(bounds) and bounds[0] == 0.0 and bounds[-1] > 3
    for v in (80, 95, 100):
        bound = one_run_lower_bound(1000, 100, v, 1e-5)
        assert (
            one_run_p_value(1000, 100, v, bound - 1e-6, 1e-5)
            < 0.05
            <= one_run_p_value(1000, 100, v, bound + 1e-6, 1e-5)
        )


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 2.0])
def test_an_epsilon_dp_guesser_exceeds_its_epsilon_no_more_often_than_the_confidence_allows(epsilon):
    """Randomized response is exactly epsilon-DP in each coin; its guesses are right with probability
    e^epsilon / (1 + e^epsilon), the most any epsilon-DP mechanism allows. Simulated 4,000 times."""
    rng = np.random.default_rng(7)
    r = 200
    right = rng.binomial(r, math.exp(epsilon) / (1 + math.exp(epsilon)), size=4000)
    bound = {v: one_run_lower_bound(1000, r, int(v), 1e-5) for v in set(right.tolist())}
    exceeded = np.mean([bound[v] > epsilon for v in right.tolist()])
    assert exceeded <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 4000)
    # and it has power: the bound reaches a good part of epsilon in a typical run
    assert np.median([bound[v] for v in right.tolist()]) > epsilon / 3


@pytest.mark.parametrize(("k", "n"), [(0, 50), (3, 50), (25, 50), (50, 50), (7, 1000)])
def test_clopper_pearson_is_scipys_exact_interval(k, n):
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    assert clopper_pearson(k, n, 0.95) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_the_membership_bound_from_error_counts_matches_the_rates_upper_limits():
    fp, fn, n = 2, 30, 300
    fpr = binomtest(fp, n).proportion_ci(0.95, method="exact").high
    fnr = binomtest(fn, n).proportion_ci(0.95, method="exact").high
    assert membership_lower_bound(fp, n, fn, n, 1e-5) == pytest.approx(math.log((1 - 1e-5 - fnr) / fpr))
    assert membership_lower_bound(150, 300, 150, 300, 1e-5) == 0.0  # a coin flip rejects nothing


def test_impossible_counts_are_refused():
    with pytest.raises(ValueError, match="0 <= v <= r <= m"):
        one_run_p_value(10, 20, 5, 1.0, 0.0)
