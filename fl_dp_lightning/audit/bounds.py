"""Empirical lower bounds on epsilon from the outcome of a membership game (pure functions over counts).

A mechanism that is (epsilon, delta)-DP limits how well anyone can tell, from what it released, which of two
neighbouring inputs it was run on. Guesses that beat that limit by more than chance allows reject the claim at a
stated confidence; the largest epsilon so rejected is an empirical lower bound. It proves a leak when it exceeds
the accountant's epsilon; it proves nothing about privacy when it is low (a stronger attack may do better).

- :func:`one_run_lower_bound`: Steinke, Nasr and Jagielski 2023, "Privacy Auditing with One (1) Training Run",
  Theorem 3.1 (an abstaining guesser, delta > 0): ``m`` canaries, each placed by a fair secret coin; ``r``
  guesses about the coins, ``v`` of them right.
- :func:`membership_lower_bound`: the many-run game (Jagielski et al. 2020, Nasr et al. 2021): a threshold test's
  false positive and false negative rates over repeated trainings, with Clopper-Pearson intervals.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import expit
from scipy.stats import beta as beta_distribution
from scipy.stats import binom


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The largest probability that ``v`` or more of ``r`` guesses about ``m`` fair coins are right, over every
    (``epsilon``, ``delta``)-DP mechanism and every guesser (Steinke et al. 2023, Theorem 3.1)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    q = float(expit(epsilon))  # the accuracy of epsilon-DP randomized response
    tail = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    # the delta term: 2 m delta max_i P[v - i <= Binomial(r, q) < v] / i over i = 1..v
    below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * alpha, 1.0)


def one_run_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that ``v`` right guesses out of ``r`` (about ``m`` canaries) reject at ``confidence``:
    no (epsilon, delta)-DP mechanism gives that many with probability above ``1 - confidence``. 0 if none."""
    level = 1 - confidence
    if one_run_p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while one_run_p_value(m, r, v, high, delta) < level:  # the p-value grows with epsilon, to 1
        low, high = high, 2 * high
    for _ in range(60):  # bisection to about 1e-15 of the bracket
        middle = (low + high) / 2
        low, high = (middle, high) if one_run_p_value(m, r, v, middle, delta) < level else (low, middle)
    return low


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact two-sided interval for a binomial proportion after ``k`` successes in ``n`` trials."""
    tail = (1 - confidence) / 2
    low = 0.0 if k == 0 else float(beta_distribution.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(beta_distribution.ppf(1 - tail, k + 1, n - k))
    return low, high


def membership_lower_bound(
    false_positives: int, negatives: int, false_negatives: int, positives: int, delta: float, confidence: float = 0.95
) -> float:
    """Epsilon that a membership test's error counts reject at ``confidence``: (epsilon, delta)-DP forces
    ``FPR + e^epsilon FNR >= 1 - delta`` (and the same with the roles swapped), here with the rates' upper
    Clopper-Pearson limits. ``negatives`` runs without the canary, ``positives`` with it. 0 if none."""
    fpr = clopper_pearson(false_positives, negatives, confidence)[1]
    fnr = clopper_pearson(false_negatives, positives, confidence)[1]
    bounds = [math.log((1 - delta - a) / b) for a, b in ((fpr, fnr), (fnr, fpr)) if b > 0 and 1 - delta - a > 0]
    return max([0.0, *bounds])
