"""Target epsilon, the budget, the privacy report and the honest defaults, each checked another way."""

from __future__ import annotations

import json
from itertools import takewhile
from pathlib import Path

import dp_accounting
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fl_dp_lightning import FederatedDataModule, FederatedDPStrategy, PrivacyConfig
from fl_dp_lightning.privacy.calibration import calibrate_noise_multiplier
from fl_dp_lightning.privacy.report import GUARANTEE

from .conftest import RecordingLogger, make_trainer
from .test_strategy import small_classifier, split


def direct_rdp_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    orders = RDPAccountant.DEFAULT_ALPHAS
    return get_privacy_spent(
        orders=orders, rdp=compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders), delta=delta
    )[0]


@pytest.mark.parametrize(
    ("target", "q", "steps", "accountant"),
    [(3.0, 128 / 30000, 2340, "rdp"), (1.0, 0.01, 1000, "rdp"), (8.0, 0.05, 600, "prv")],
)
def test_calibrated_noise_lands_within_1_percent_under_the_target(target, q, steps, accountant):
    sigma = calibrate_noise_multiplier(
        target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps, accountant=accountant
    )
    if accountant == "rdp":
        reached = direct_rdp_epsilon(q, sigma, steps, 1e-5)
    else:  # PRV is checked against dp-accounting's PLD, within PRV's 0.01 error
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        pld = dp_accounting.pld.PLDAccountant()
        pld.compose(event, steps)
        reached = pld.get_epsilon(1e-5) + 0.01
    assert 0.99 * target <= reached <= target * 1.0005


def test_an_unreachable_target_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="target_epsilon=0.001 is out of reach"):
        calibrate_noise_multiplier(target_epsilon=0.001, delta=1e-5, sample_rate=1.0, steps=10**6)


def fit(synthetic, privacy, rounds, sizes=(300, 900), batch=30, logger=False):
    parts = split(synthetic.train, list(sizes))
    datamodule = FederatedDataModule(
        train={"small": parts[0], "large": parts[1]}, test=synthetic.test, batch_size=batch
    )
    strategy = FederatedDPStrategy(privacy=privacy)
    trainer = make_trainer(strategy, rounds, logger=logger)
    trainer.fit(small_classifier(), datamodule)
    return trainer, strategy


def test_target_epsilon_through_the_strategy_ends_just_under_the_target(synthetic):
    trainer, strategy = fit(synthetic, PrivacyConfig(target_epsilon=4.0), rounds=3)
    for name, n in (("small", 300), ("large", 900)):
        client = strategy.clients[name]
        steps = 3 * int(n / 30)
        assert client.accountant.history == [(client.noise_multiplier, 30 / n, steps)]
        assert 0.99 * 4.0 <= direct_rdp_epsilon(30 / n, client.noise_multiplier, steps, 1e-5) <= 4.0
    assert strategy.clients["small"].noise_multiplier > strategy.clients["large"].noise_multiplier


def test_the_budget_benches_the_right_client_in_the_right_round_and_ends_the_run(synthetic):
    sigma, delta, budget = 1.0, 1e-5, 3.3
    # small: 400 records, q = 30/400, 13 steps a round; large: 800 records, q = 30/800, 26 steps a round
    eps_small = [direct_rdp_epsilon(30 / 400, sigma, r * 13, delta) for r in range(1, 7)]
    eps_large = [direct_rdp_epsilon(30 / 800, sigma, r * 26, delta) for r in range(1, 7)]
    rounds_small = sum(1 for _ in takewhile(lambda e: e <= budget, eps_small))
    rounds_large = sum(1 for _ in takewhile(lambda e: e <= budget, eps_large))
    assert (rounds_small, rounds_large) == (1, 4)  # the test's design: small stops first, then large

    logger = RecordingLogger()
    trainer, strategy = fit(
        synthetic, PrivacyConfig(noise_multiplier=sigma, max_epsilon=budget), rounds=6, sizes=(400, 800), logger=logger
    )
    assert strategy.clients["small"].accountant.history == [(sigma, 30 / 400, 13 * rounds_small)]
    assert strategy.clients["large"].accountant.history == [(sigma, 30 / 800, 26 * rounds_large)]
    assert sorted(logger.series("train/loss/small")) == list(range(rounds_small))
    assert sorted(logger.series("train/loss/large")) == list(range(rounds_large))
    assert trainer.should_stop and trainer.current_epoch < 6  # ended early: nobody could train round 5
    assert all(eps <= budget for eps in strategy.epsilons().values())


def test_the_privacy_report_states_what_each_client_spent(synthetic):
    trainer, strategy = fit(synthetic, PrivacyConfig(noise_multiplier=1.3, accountant="prv"), rounds=2)
    report = json.loads((Path(trainer.default_root_dir) / "privacy_report.json").read_text())
    assert report["guarantee"] == GUARANTEE and report["accountant"] == "prv"
    small = report["clients"]["small"]
    assert small["steps"] == 2 * 10 and small["sample_rate"] == pytest.approx(0.1) and small["noise_multiplier"] == 1.3
    assert small["epsilon"] == pytest.approx(strategy.clients["small"].epsilon(1e-5))


def test_a_delta_above_one_over_n_is_refused_with_the_fix(synthetic):
    with pytest.raises(ValueError, match=r"privacy.delta=0.005 is not below 1/n = 1/300 for client 'small'"):
        fit(synthetic, PrivacyConfig(delta=5e-3), rounds=1)


def test_turning_poisson_sampling_off_warns_that_the_accounting_assumes_it(synthetic):
    with pytest.warns(UserWarning, match="accounting assumes Poisson sampling"):
        fit(synthetic, PrivacyConfig(poisson_sampling=False), rounds=1)


def test_secure_mode_seeds_noise_from_os_entropy_not_the_run_seed(synthetic):
    with pytest.warns(UserWarning, match="secure_mode"):
        _, first = fit(synthetic, PrivacyConfig(secure_mode=True), rounds=1)
        _, second = fit(synthetic, PrivacyConfig(secure_mode=True), rounds=1)
    _, plain = fit(synthetic, PrivacyConfig(), rounds=1)
    _, plain_again = fit(synthetic, PrivacyConfig(), rounds=1)
    state = {
        name: [c.clients["small"].noise_rng.get_state() for c in runs]
        for name, runs in {"secure": (first, second), "plain": (plain, plain_again)}.items()
    }
    assert not torch.equal(*state["secure"])  # two secure runs draw different noise
    assert torch.equal(*state["plain"])  # seeded runs reproduce theirs
