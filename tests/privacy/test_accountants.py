"""Accountants against independent computations: the seed's table, Opacus's known value, Google's dp-accounting,
and a Monte Carlo estimate of the replace-one privacy loss."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy.stats import norm

from fl_dp_lightning.privacy.accountants import (
    CLASSIC_ORDERS,
    ORDERS,
    add_remove_rdp,
    classic_rdp_to_dp,
    epsilon_spent,
    make_accountant,
)

from ..conftest import direct_rdp_epsilon

# the seed's progress bars read "235/235": 235 steps per round at sample rate 128 / 30,000
SEED_Q, SEED_SIGMA, SEED_STEPS_PER_ROUND, SEED_DELTA = 128 / 30000, 1.2, 235, 1e-5
SEED_TABLE = [0.86, 0.90, 0.94, 0.97, 1.01]  # the tutorial's printed epsilon after rounds 1..5, order 15

# (sample rate, noise multiplier, steps): small and large q, low and high noise, short and long runs
SETTINGS = [
    (SEED_Q, 1.2, 5 * SEED_STEPS_PER_ROUND),
    (0.01, 1.0, 1000),
    (0.04, 1.5, 2250),
    (0.001, 0.8, 5000),
    (0.1, 2.0, 300),
    (0.02, 1.1, 500),
    (0.005, 0.7, 2000),
]
DELTA = 1e-5


def accountant_after(name: str, q: float, sigma: float, steps: int, conversion: str = "improved"):
    accountant = make_accountant(name, conversion)
    accountant.history = [(sigma, q, steps)]
    return accountant


def dp_accounting_epsilon(kind: str, q: float, sigma: float, steps: int, relation: str = "ADD_OR_REMOVE_ONE") -> float:
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    neighbours = getattr(dp_accounting.NeighboringRelation, relation)
    if kind == "rdp":
        accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=neighbours)
    else:
        accountant = dp_accounting.pld.PLDAccountant(neighboring_relation=neighbours)
    accountant.compose(event, steps)
    return accountant.get_epsilon(DELTA)


@pytest.mark.parametrize("round_no", range(1, 6))
def test_add_remove_classic_conversion_reproduces_the_seed_table(round_no):
    steps = round_no * SEED_STEPS_PER_ROUND
    rdp = add_remove_rdp([(SEED_SIGMA, SEED_Q, steps)], CLASSIC_ORDERS)
    eps, order = classic_rdp_to_dp(CLASSIC_ORDERS, rdp, SEED_DELTA)
    assert round(eps, 2) == SEED_TABLE[round_no - 1]
    assert order == 15


def test_classic_conversion_is_the_textbook_formula():
    rdp = compute_rdp(q=0.02, noise_multiplier=1.1, steps=500, orders=list(CLASSIC_ORDERS))
    by_hand = min(r - np.log(DELTA) / (a - 1) for a, r in zip(CLASSIC_ORDERS, rdp))
    assert classic_rdp_to_dp(CLASSIC_ORDERS, rdp, DELTA)[0] == pytest.approx(by_hand, rel=1e-12)


def test_add_remove_rdp_gives_opacus_known_value():
    rdp = add_remove_rdp([(1.5, 0.04, 2250)], ORDERS)
    assert get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=DELTA)[0] == pytest.approx(7.3291, abs=1e-4)


@pytest.mark.parametrize(("q", "sigma", "steps"), SETTINGS)
def test_add_remove_rdp_agrees_with_dp_accounting(q, sigma, steps):
    rdp = add_remove_rdp([(sigma, q, steps)], ORDERS)
    ours = get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=DELTA)[0]
    assert ours == pytest.approx(dp_accounting_epsilon("rdp", q, sigma, steps), rel=1e-3)


@pytest.mark.parametrize(("q", "sigma", "steps"), SETTINGS)
def test_pld_is_dp_accountings_replace_one_pld_and_above_add_remove(q, sigma, steps):
    ours = epsilon_spent(accountant_after("pld", q, sigma, steps), DELTA)
    finer = dp_accounting_epsilon("pld", q, sigma, steps, "REPLACE_ONE")  # dp-accounting's default, finer grid
    assert finer <= ours <= 1.01 * finer  # a coarser pessimistic grid: still an upper bound, within 1 %
    # one record replaced moves the output further than one added or removed
    assert ours > dp_accounting_epsilon("pld", q, sigma, steps)


@pytest.mark.parametrize(("q", "sigma", "steps"), SETTINGS)
def test_replace_one_rdp_is_the_weak_triangle_bound_computed_with_dp_accounting(q, sigma, steps):
    expected = direct_rdp_epsilon(q, sigma, steps, DELTA)
    ours = epsilon_spent(accountant_after("rdp", q, sigma, steps), DELTA)
    assert ours == pytest.approx(expected, rel=2e-3)
    assert ours >= epsilon_spent(accountant_after("pld", q, sigma, steps), DELTA)  # a looser, valid bound
    assert epsilon_spent(accountant_after("rdp", q, sigma, steps, "classic"), DELTA) >= ours


@pytest.mark.parametrize(("q", "sigma", "steps"), [(0.1, 1.0, 20), (0.3, 2.0, 10)])
def test_pld_epsilon_matches_a_monte_carlo_estimate_of_the_replace_one_privacy_loss(q, sigma, steps):
    # Replacing one record, in units of the clip norm: it joins the batch with probability q, adding -1 on one data
    # set and +1 on the other (the worst case), under Gaussian noise sigma. delta(eps) = E_P[(1 - e^(eps - L))+]
    # with L the summed privacy loss ln P(x) / Q(x) over the steps, x drawn from P.
    delta = 1e-3
    eps = epsilon_spent(accountant_after("pld", q, sigma, steps), delta)
    rng = np.random.default_rng(0)
    n = 400_000
    shift = -(rng.random((n, steps)) < q).astype(float)
    x = shift + sigma * rng.standard_normal((n, steps))

    def mixture(centre: float) -> np.ndarray:
        return q * norm.pdf(x, centre, sigma) + (1 - q) * norm.pdf(x, 0, sigma)

    loss = np.log(mixture(-1.0) / mixture(1.0)).sum(axis=1)
    estimate = np.maximum(0.0, 1 - np.exp(eps - loss)).mean()
    assert estimate == pytest.approx(delta, rel=0.1)  # the PLD is pessimistic: never much below the truth


def test_unknown_accountant_or_conversion_is_refused():
    with pytest.raises(ValueError, match="privacy.accountant='moments'"):
        make_accountant("moments")
    with pytest.raises(ValueError, match="privacy.rdp_conversion='loose'"):
        make_accountant("rdp", "loose")


@pytest.mark.filterwarnings("ignore:GDP accounting is experimental")
@pytest.mark.parametrize(("q", "sigma", "steps"), SETTINGS)
def test_gdp_equals_the_central_limit_gdp_bound_computed_independently(q, sigma, steps):
    from scipy.optimize import brentq
    from scipy.stats import norm

    # Poisson-subsampled Gaussian under the CLT (Bu et al. 2020): mu = q sqrt(T (e^{1/sigma^2} - 1)),
    # then the mu-GDP curve delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2), solved for delta
    mu = q * np.sqrt(steps * (np.exp(sigma**-2) - 1))

    def delta_at(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - np.exp(eps) * norm.cdf(-eps / mu - mu / 2) - DELTA

    expected = brentq(delta_at, 1e-9, 100)
    assert epsilon_spent(accountant_after("gdp", q, sigma, steps), DELTA) == pytest.approx(expected, rel=1e-3)
