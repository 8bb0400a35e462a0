"""Accountants against independent computations: the seed's table, Opacus's known value, Google's dp-accounting."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp

from fl_dp_lightning.privacy.accountants import CLASSIC_ORDERS, classic_rdp_to_dp, epsilon_spent, make_accountant

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


def dp_accounting_epsilon(kind: str, q: float, sigma: float, steps: int) -> float:
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant = dp_accounting.rdp.RdpAccountant() if kind == "rdp" else dp_accounting.pld.PLDAccountant()
    accountant.compose(event, steps)
    return accountant.get_epsilon(DELTA)


@pytest.mark.parametrize("round_no", range(1, 6))
def test_classic_conversion_reproduces_the_seed_table(round_no):
    accountant = accountant_after("rdp", SEED_Q, SEED_SIGMA, round_no * SEED_STEPS_PER_ROUND, "classic")
    eps, order = accountant.get_privacy_spent(delta=SEED_DELTA)
    assert round(eps, 2) == SEED_TABLE[round_no - 1]
    assert order == 15


def test_classic_conversion_is_the_textbook_formula():
    rdp = compute_rdp(q=0.02, noise_multiplier=1.1, steps=500, orders=list(CLASSIC_ORDERS))
    by_hand = min(r - np.log(DELTA) / (a - 1) for a, r in zip(CLASSIC_ORDERS, rdp))
    assert classic_rdp_to_dp(CLASSIC_ORDERS, rdp, DELTA)[0] == pytest.approx(by_hand, rel=1e-12)


def test_opacus_known_value():
    assert epsilon_spent(accountant_after("rdp", 0.04, 1.5, 2250), DELTA) == pytest.approx(7.3291, abs=1e-4)


@pytest.mark.parametrize(("q", "sigma", "steps"), SETTINGS)
def test_rdp_agrees_with_dp_accounting_rdp_and_bounds_its_pld(q, sigma, steps):
    ours = epsilon_spent(accountant_after("rdp", q, sigma, steps), DELTA)
    # same conversion, slightly different order grids: agreement to 0.1 %
    assert ours == pytest.approx(dp_accounting_epsilon("rdp", q, sigma, steps), rel=1e-3)
    # PLD is (near-)exact for this mechanism; RDP is an upper bound on it
    assert ours >= dp_accounting_epsilon("pld", q, sigma, steps)
    classic = epsilon_spent(accountant_after("rdp", q, sigma, steps, "classic"), DELTA)
    assert classic >= ours


@pytest.mark.parametrize(("q", "sigma", "steps"), SETTINGS)
def test_prv_upper_bound_is_within_its_error_bound_of_dp_accounting_pld(q, sigma, steps):
    eps_error = 0.01  # Opacus's default: get_epsilon returns an upper bound at most eps_error above the estimate
    prv = epsilon_spent(accountant_after("prv", q, sigma, steps), DELTA)
    pld = dp_accounting_epsilon("pld", q, sigma, steps)
    assert pld - 2e-3 <= prv <= pld + eps_error + 2e-3


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
