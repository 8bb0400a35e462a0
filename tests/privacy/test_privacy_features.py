"""Target epsilon, the budget, the privacy report and the honest defaults, each checked another way."""

from __future__ import annotations

import json
from itertools import takewhile
from pathlib import Path

import pytest

from fl_dp_lightning import FederatedDataModule, FederatedDPStrategy, PrivacyConfig
from fl_dp_lightning.config import ConfigError
from fl_dp_lightning.privacy.calibration import calibrate_noise_multiplier
from fl_dp_lightning.privacy.report import GUARANTEE

from ..conftest import RecordingLogger, direct_epsilon, direct_rdp_epsilon, make_trainer
from ..strategy.test_strategy import small_classifier, split

DIRECT = {"pld": direct_epsilon, "rdp": direct_rdp_epsilon}


@pytest.mark.parametrize(
    ("target", "q", "steps", "accountant"),
    [(3.0, 128 / 30000, 2340, "pld"), (1.0, 0.01, 1000, "pld"), (8.0, 0.05, 600, "rdp")],
)
def test_calibrated_noise_lands_within_1_percent_under_the_target(target, q, steps, accountant):
    sigma = calibrate_noise_multiplier(
        target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps, accountant=accountant
    )
    reached = DIRECT[accountant](q, sigma, steps, 1e-5)
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
        assert 0.99 * 4.0 <= direct_epsilon(30 / n, client.noise_multiplier, steps, 1e-5) <= 4.0
    assert strategy.clients["small"].noise_multiplier > strategy.clients["large"].noise_multiplier


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_the_budget_benches_the_right_client_in_the_right_round_and_ends_the_run(synthetic, accountant):
    sigma, delta, direct = 1.0, 1e-5, DIRECT[accountant]
    # small: 400 records, q = 30/400, 13 steps a round; large: 800 records, q = 30/800, 26 steps a round
    eps_small = [direct(30 / 400, sigma, r * 13, delta) for r in range(1, 7)]
    eps_large = [direct(30 / 800, sigma, r * 26, delta) for r in range(1, 7)]
    # the test's design: small stops after round 1, large after round 4
    low, high = max(eps_small[0], eps_large[3]), min(eps_small[1], eps_large[4])
    assert low < high
    budget = (low + high) / 2
    rounds_small = sum(1 for _ in takewhile(lambda e: e <= budget, eps_small))
    rounds_large = sum(1 for _ in takewhile(lambda e: e <= budget, eps_large))
    assert (rounds_small, rounds_large) == (1, 4)

    logger = RecordingLogger()
    privacy = PrivacyConfig(noise_multiplier=sigma, max_epsilon=budget, accountant=accountant)
    trainer, strategy = fit(synthetic, privacy, rounds=6, sizes=(400, 800), logger=logger)
    assert strategy.clients["small"].accountant.history == [(sigma, 30 / 400, 13 * rounds_small)]
    assert strategy.clients["large"].accountant.history == [(sigma, 30 / 800, 26 * rounds_large)]
    assert trainer.should_stop and trainer.current_epoch < 6  # ended early: nobody could train round 5
    assert strategy.epsilons()["small"] == pytest.approx(eps_small[0], rel=1e-3)
    assert strategy.epsilons()["large"] == pytest.approx(eps_large[3], rel=1e-3)


@pytest.mark.parametrize("key", ["max_epsilon", "target_epsilon"])
def test_gdp_is_refused_where_epsilon_must_be_guaranteed(key):
    with pytest.raises(ConfigError, match=f"privacy.{key}=3.0: .*accountant=gdp is an approximation"):
        PrivacyConfig(accountant="gdp", **{key: 3.0})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"noise_multiplier": 0.0}, "privacy.noise_multiplier=0.0: must be > 0 .*use privacy=none"),
        ({"noise_multiplier": float("inf")}, "privacy.noise_multiplier=inf: must be > 0 and finite"),
        ({"max_grad_norm": float("inf")}, "privacy.max_grad_norm=inf"),
        ({"target_epsilon": float("inf")}, "privacy.target_epsilon=inf"),
        ({"accountant": "prv"}, "privacy.accountant='prv': .*replace-one.*use privacy.accountant=pld"),
        ({"secure_mode": True, "unsafe_seeded_randomness": True}, "privacy.secure_mode=True: contradicts"),
        ({"poisson_sampling": False, "max_epsilon": 2.0}, "privacy.max_epsilon=2.0: needs a proven epsilon"),
    ],
)
def test_settings_that_would_print_a_false_guarantee_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        PrivacyConfig(**settings)


def test_the_privacy_report_states_the_adjacency_what_each_client_spent_and_every_channel(synthetic):
    trainer, strategy = fit(synthetic, PrivacyConfig(noise_multiplier=1.3, accountant="rdp"), rounds=2)
    report = json.loads((Path(trainer.default_root_dir) / "privacy_report.json").read_text())
    assert report["guarantee"] == GUARANTEE and report["accountant"] == "rdp" and report["adjacency"] == "replace-one"
    assert any(line.startswith("model weights after each round") for line in report["released"])
    assert any("record count" in line for line in report["released"])
    assert not any("NOT covered" in line for line in report["released"]) and len(report["not_covered"]) == 1
    small = report["clients"]["small"]
    assert small["steps"] == 2 * 10 and small["sample_rate"] == pytest.approx(0.1) and small["noise_multiplier"] == 1.3
    assert small["epsilon"] == pytest.approx(direct_rdp_epsilon(0.1, 1.3, 20, 1e-5), rel=2e-3)


@pytest.mark.filterwarnings("ignore:GDP accounting is experimental")
@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"accountant": "gdp"}, "central-limit approximation"),
        ({"unsafe_seeded_randomness": True}, "anyone who knows the seed"),
        ({"unsafe_release_training_metrics": True}, "released without noise"),
    ],
)
def test_a_weakened_run_reports_no_guarantee_and_names_why(synthetic, settings, says):
    with pytest.warns(UserWarning, match="the privacy guarantee is weakened by"):
        trainer, strategy = fit(synthetic, PrivacyConfig(**settings), rounds=1)
    report = json.loads((Path(trainer.default_root_dir) / "privacy_report.json").read_text())
    assert report["guarantee"].startswith("none proven") and says in report["guarantee"]
    assert any(says in line for line in report["not_covered"])


def test_shuffled_batches_report_epsilon_as_not_proven_and_log_none(synthetic, caplog):
    logger = RecordingLogger()
    with pytest.warns(UserWarning, match="poisson_sampling=false"), caplog.at_level("INFO"):
        trainer, strategy = fit(synthetic, PrivacyConfig(poisson_sampling=False), rounds=1, logger=logger)
    report = json.loads((Path(trainer.default_root_dir) / "privacy_report.json").read_text())
    assert report["guarantee"].startswith("none proven")
    assert all(row["epsilon"] is None for row in report["clients"].values())
    assert not any(key.startswith("privacy/") for _, metrics in logger.records for key in metrics)
    assert "ε not proven" in caplog.text and "ε =" not in caplog.text


def test_privacy_none_reports_no_dp_honestly(synthetic):
    trainer, _ = fit(synthetic, PrivacyConfig(enabled=False), rounds=1)
    report = json.loads((Path(trainer.default_root_dir) / "privacy_report.json").read_text())
    assert report["accountant"] is None and report["guarantee"].startswith("none: privacy.enabled is false")
    assert all(row["epsilon"] is None and row["noise_multiplier"] is None for row in report["clients"].values())
    assert report["clients"]["small"]["steps"] == 300 // 30  # the steps it trained, without an accountant


def test_a_delta_above_one_over_n_is_refused_with_the_fix(synthetic):
    with pytest.raises(ValueError, match=r"privacy.delta=0.005 is not below 1/n = 1/300 for client 'small'"):
        fit(synthetic, PrivacyConfig(delta=5e-3), rounds=1)
