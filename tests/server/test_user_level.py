"""User-level DP (DP-FedAvg with fixed or adaptive clipping) against hand computations and direct accountants."""

from __future__ import annotations

import math

import dp_accounting
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from fl_dp_lightning import ConfigError, FederatedDataModule, FederatedDPStrategy, PrivacyConfig
from fl_dp_lightning.config import UserPrivacyConfig
from fl_dp_lightning.privacy.report import privacy_report
from fl_dp_lightning.privacy.user_level import (
    COUNT_SENSITIVITY,
    clip_update,
    noised_mean,
    update_noise_multiplier,
    update_norm,
)
from fl_dp_lightning.server.aggregate import RunningAverage
from fl_dp_lightning.server.user_level import UserLevelDP

from ..config.test_config import composed
from ..conftest import RecordingLogger, direct_epsilon, make_trainer
from ..strategy.test_strategy import small_classifier, weights

OFF = PrivacyConfig(enabled=False)


def test_clipping_bounds_an_update_to_the_clip_norm_and_leaves_small_ones_alone():
    torch.manual_seed(0)
    for scale in (0.01, 0.3, 5.0, 100.0):
        update = {"w": torch.randn(10, 4) * scale, "b": torch.randn(4) * scale}
        clipped, norm = clip_update(update, 1.0)
        assert norm == pytest.approx(update_norm(update))
        if norm <= 1.0:
            assert all(torch.equal(clipped[k], update[k]) for k in update)
        else:
            assert update_norm(clipped) == pytest.approx(1.0, rel=1e-6)


def test_the_server_noise_has_standard_deviation_z_times_clip_over_expected_clients():
    zeros = {"w": torch.zeros(200_000, dtype=torch.float64)}
    mean = noised_mean(zeros, clip=0.7, noise_multiplier=1.3, expected_clients=25, generator=torch.Generator())
    measured, expected = float(mean["w"].std()), 1.3 * 0.7 / 25
    assert measured == pytest.approx(expected, rel=5 / math.sqrt(2 * 200_000))  # 5 standard errors


@pytest.mark.parametrize("fits", [True, False], ids=["its_update_fits", "its_update_is_clipped"])
def test_the_released_count_moves_by_the_sensitivity_its_noise_is_accounted_for(fits):
    """Two neighbouring client sets (one client more) through the server's mechanism with the same seeded noise:
    the released count, read back from the released clip, moves by the count's accounted sensitivity, and the
    noise split at that measured sensitivity composes to the noise multiplier the accountant holds."""
    config = UserPrivacyConfig(enabled=True, noise_multiplier=1.0, clip=1.0, adaptive_clipping=True, count_noise=2.0)

    def server() -> UserLevelDP:
        return UserLevelDP(config, sample_rate=1.0, num_clients=10, seeded=True, seed=5, device=torch.device("cpu"))

    def released_clip(norms: list[float]) -> float:
        mechanism = server()
        for norm in norms:
            mechanism.clipped({"w": torch.tensor([norm], dtype=torch.float64)})
        mechanism.release({"w": torch.zeros(1, dtype=torch.float64)})
        return mechanism.clip

    others = [0.5, 2.0, 0.1, 3.0]
    without, with_one_more = released_clip(others), released_clip([*others, 0.5 if fits else 5.0])
    # clip' = clip * exp(-lr * (count / expected + 1/2 - quantile)): the count moved by log(ratio) * expected / lr
    moved = abs(math.log(with_one_more / without)) * 10 / config.clip_learning_rate
    assert moved == pytest.approx(COUNT_SENSITIVITY, rel=1e-9)
    z_update = server().update_noise()
    assert (z_update**-2 + (moved / 2.0) ** 2) ** -0.5 == pytest.approx(config.noise_multiplier, rel=1e-12)
    with pytest.raises(ValueError, match="must exceed"):
        update_noise_multiplier(1.0, 0.4)


ENGINES = pytest.mark.parametrize("engine", ["opacus", "vectorized"])


def fit(
    synthetic, user, *, clients=12, rounds=3, fraction=0.5, sampling="poisson", privacy=OFF, engine="opacus", **kwargs
):
    pl.seed_everything(0)
    module = small_classifier()
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=clients, batch_size=20)
    strategy = FederatedDPStrategy(
        privacy=privacy, user_privacy=user, client_fraction=fraction, client_sampling=sampling, seed=4, engine=engine
    )
    make_trainer(strategy, rounds, **kwargs).fit(module, datamodule)
    return module, strategy


@ENGINES
def test_each_clients_contribution_is_clipped_to_the_norm_in_a_real_run(synthetic, monkeypatch, engine):
    norms = []
    real_add = RunningAverage.add

    def record(self, state, weight, client=None):
        norms.append(update_norm(state))
        real_add(self, state, weight, client)

    monkeypatch.setattr(RunningAverage, "add", record)
    fit(
        synthetic, UserPrivacyConfig(enabled=True, clip=0.05), fraction=1.0, sampling="uniform", rounds=1, engine=engine
    )
    assert len(norms) == 12 and max(norms) <= 0.05 * (1 + 1e-6) and min(norms) > 0.04  # the updates exceed 0.05


@ENGINES
@pytest.mark.parametrize("accountant", ["pld", "rdp", "prv"])
def test_the_user_level_epsilon_equals_a_direct_accountant_computation(synthetic, accountant, engine):
    user = UserPrivacyConfig(enabled=True, noise_multiplier=0.9, clip=0.5, accountant=accountant)
    _, strategy = fit(synthetic, user, rounds=3, fraction=0.5, engine=engine)
    event = dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(0.9))
    add_remove = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    if accountant == "rdp":
        direct = dp_accounting.rdp.RdpAccountant(neighboring_relation=add_remove)
        tolerance = 0.03  # another grid of orders and conversion
    else:
        direct = dp_accounting.pld.PLDAccountant(neighboring_relation=add_remove, value_discretization_interval=1e-4)
        tolerance = 0.02  # PLD grid and PRV error bounds
    expected = direct.compose(event, 3).get_epsilon(1e-5)
    assert strategy.user_level.epsilon() == pytest.approx(expected, rel=tolerance)
    assert strategy.user_level.accountant.history == [(0.9, 0.5, 3)]


@ENGINES
def test_a_round_nobody_joins_still_releases_noise_and_is_accounted(synthetic, engine):
    user = UserPrivacyConfig(enabled=True, noise_multiplier=1.0, clip=0.1)
    before = weights(small_classifier())
    seeded = PrivacyConfig(enabled=False, unsafe_seeded_randomness=True)  # the same (empty) rounds every time
    module, strategy = fit(synthetic, user, fraction=1e-4, rounds=2, privacy=seeded, engine=engine)
    assert sum(c.steps_taken for c in strategy.clients.values()) == 0  # nobody trained in either round
    assert strategy.user_level.accountant.history == [(1.0, 1e-4, 2)]
    assert strategy.user_level.report(guaranteed=True)["participation"].startswith("withheld")
    changed = [not torch.equal(v, before[k]) for k, v in weights(module).items()]
    assert all(changed)  # every parameter moved by the server's noise alone


@ENGINES
def test_every_round_is_accounted_when_poisson_client_sampling_leaves_some_empty(synthetic, engine):
    """Four clients at q = 0.15: most rounds have nobody; the model moves in each (server noise) and the
    user-level epsilon is dp-accounting's PLD of all the rounds, empty ones included."""
    user = UserPrivacyConfig(enabled=True, noise_multiplier=1.0, clip=0.1)
    seeded = PrivacyConfig(enabled=False, unsafe_seeded_randomness=True)
    logger = RecordingLogger()
    _, strategy = fit(synthetic, user, clients=4, fraction=0.15, rounds=8, privacy=seeded, engine=engine, logger=logger)
    steps = [step for step, m in logger.records if "privacy/user_epsilon" in m]
    assert steps == list(range(8))
    empty = [r for r in range(8) if not strategy._full_plan(r).segments]
    assert len(empty) >= 3  # the test has power: several rounds with nobody
    direct = dp_accounting.pld.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-4
    )
    event = dp_accounting.PoissonSampledDpEvent(0.15, dp_accounting.GaussianDpEvent(1.0))
    assert strategy.user_level.accountant.history == [(1.0, 0.15, 8)]
    assert strategy.user_level.epsilon() == pytest.approx(direct.compose(event, 8).get_epsilon(1e-5), rel=0.02)


def test_adaptive_clipping_converges_to_the_target_quantile_of_known_update_norms():
    # norms uniform on [0, 2]: the median is 1 and the 0.8 quantile 1.6
    generator = torch.Generator().manual_seed(0)
    for quantile, true_value in [(0.5, 1.0), (0.8, 1.6)]:
        config = UserPrivacyConfig(
            enabled=True, noise_multiplier=1.0, clip=0.1, adaptive_clipping=True, target_quantile=quantile
        )
        server = UserLevelDP(config, sample_rate=1.0, num_clients=200, seeded=True, seed=1, device=torch.device("cpu"))
        history = []
        for _ in range(150):
            for norm in (torch.rand(200, generator=generator) * 2).tolist():
                server.clipped({"w": torch.tensor([norm])})
            server.release({"w": torch.zeros(1, dtype=torch.float64)})
            history.append(server.clip)
        assert statistics_mean(history[-50:]) == pytest.approx(true_value, rel=0.08)
        # the count query is paid for: the accountant holds the total noise multiplier, the updates get more noise
        assert server.accountant.history == [(1.0, 1.0, 150)] and server.update_noise() > 1.0


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_resume_is_exact_under_user_level_dp(synthetic, tmp_path):
    seeded = PrivacyConfig(enabled=False, unsafe_seeded_randomness=True)
    user = UserPrivacyConfig(enabled=True, noise_multiplier=1.0, clip=0.2, adaptive_clipping=True, count_noise=2.0)
    full, full_strategy = fit(synthetic, user, rounds=3, privacy=seeded)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    fit(synthetic, user, rounds=1, privacy=seeded, enable_checkpointing=True, callbacks=[checkpoint])
    pl.seed_everything(0)
    module = small_classifier()
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=12, batch_size=20)
    strategy = FederatedDPStrategy(
        privacy=seeded, user_privacy=user, client_fraction=0.5, client_sampling="poisson", seed=4
    )
    trainer = make_trainer(strategy, 3, enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=tmp_path)])
    trainer.fit(module, datamodule, ckpt_path=tmp_path / "last.ckpt")
    for key, value in weights(full).items():
        torch.testing.assert_close(weights(module)[key], value, atol=1e-6, rtol=0)
    assert strategy.user_level.clip == full_strategy.user_level.clip
    assert strategy.user_level.epsilon() == full_strategy.user_level.epsilon()


def test_settings_user_level_dp_cannot_account_are_refused():
    with pytest.raises(ConfigError, match="client.sampling=poisson"):
        FederatedDPStrategy(user_privacy=UserPrivacyConfig(enabled=True), client_fraction=0.5)
    from fl_dp_lightning.strategy.distributed import DistributedFederatedDPStrategy

    with pytest.raises(ConfigError, match="one process"):
        DistributedFederatedDPStrategy(user_privacy=UserPrivacyConfig(enabled=True))
    with pytest.raises(ConfigError, match="user_privacy.clip=0"):
        UserPrivacyConfig(enabled=True, clip=0)


def test_train_py_logs_the_user_level_epsilon_beside_the_record_level_ones(tmp_path):
    from fl_dp_lightning.cli import run

    overrides = ("data=synthetic", "user_privacy=dpfedavg", "trainer.rounds=2", "trainer.batch_size=50")
    results = run(composed(*overrides, "trainer.progress_bar=false"), tmp_path)
    report = (tmp_path / "privacy_report.json").read_text()
    assert '"user_level": {' in report and results["epsilon"]["alice"] > 0
    direct = dp_accounting.pld.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-3
    )
    expected = direct.compose(dp_accounting.GaussianDpEvent(1.0), 2).get_epsilon(1e-5)  # both clients every round
    assert results["user_epsilon"] == pytest.approx(expected, rel=1e-6)  # Poisson at q = 1 is the plain Gaussian


def test_a_user_level_target_is_reached_with_a_server_optimizer_stepping_after_the_noise(synthetic):
    from fl_dp_lightning.config import ServerConfig

    pl.seed_everything(0)
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=12, batch_size=20)
    user = UserPrivacyConfig(enabled=True, target_epsilon=2.0, clip=0.2)
    strategy = FederatedDPStrategy(
        privacy=OFF,
        user_privacy=user,
        client_fraction=0.5,
        client_sampling="poisson",
        server=ServerConfig(optimizer="fedavgm", momentum=0.5),
    )
    make_trainer(strategy, 3).fit(small_classifier(), datamodule)
    assert 0.99 * 2.0 <= strategy.user_level.epsilon() <= 2.0
    assert strategy.user_level.noise_multiplier != user.noise_multiplier
    assert strategy.server_state and all(k.startswith("m.") for k in strategy.server_state)  # FedAvgM's momentum


@ENGINES
def test_no_per_client_participation_reaches_a_logger_by_default_under_sampled_user_level_dp(synthetic, engine, caplog):
    """Record-level and user-level DP with Poisson client sampling: no tag, log line or report field names a
    client or its steps per round; the released record-level epsilon is the every-round bound, the same for all."""
    logger = RecordingLogger()
    user = UserPrivacyConfig(enabled=True, noise_multiplier=1.0, clip=0.1)
    with caplog.at_level("INFO"):
        _, strategy = fit(synthetic, user, clients=6, fraction=0.5, rounds=3, privacy=PrivacyConfig(), engine=engine,
                          logger=logger)  # fmt: skip
    names = list(strategy.clients)
    steps = {c.steps_taken for c in strategy.clients.values()}
    assert len(steps) > 1  # power: participation differed between clients, so per-client values would show it
    tags = {key for _, metrics in logger.records for key in metrics}
    assert not [t for t in tags if any(n in t for n in names)]
    round_lines = [r.getMessage() for r in caplog.records if "round" in r.getMessage()]
    assert round_lines and not [line for line in round_lines if any(repr(n) in line or f"[{n}]" in line for n in names)]
    report = privacy_report(strategy)
    assert all(row["steps"] is None for row in report["clients"].values())
    assert len({row["epsilon"] for row in report["clients"].values()}) == 1  # one bound: nothing per client
    assert report["user_level"]["participation"].startswith("withheld")
    bound = max(c.epsilon(1e-5) for c in strategy.clients.values())
    assert report["clients"][names[0]]["epsilon"] >= bound - 1e-9  # a bound on every client's own epsilon
    client = strategy.clients[names[0]]  # and it is dp-accounting's replace-one PLD of every round's steps
    direct = direct_epsilon(client.sample_rate, client.noise_multiplier, 3 * client.steps_per_round, 1e-5)
    assert report["clients"][names[0]]["epsilon"] == pytest.approx(direct, rel=0.02)


@ENGINES
def test_released_participation_is_accounted_without_amplification(synthetic, engine):
    logger = RecordingLogger()
    user = UserPrivacyConfig(enabled=True, noise_multiplier=1.0, clip=0.1, release_participation=True)
    _, strategy = fit(
        synthetic, user, clients=6, fraction=0.5, rounds=3, privacy=PrivacyConfig(), logger=logger, engine=engine
    )
    assert strategy.user_level.accountant.history == [(1.0, 1.0, 3)]
    direct = dp_accounting.pld.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-4
    )
    expected = direct.compose(dp_accounting.GaussianDpEvent(1.0), 3).get_epsilon(1e-5)  # three unsampled rounds
    assert strategy.user_level.epsilon() == pytest.approx(expected, rel=0.02)
    tags = {key for _, metrics in logger.records for key in metrics}
    assert {f"privacy/epsilon/{n}" for n in strategy.clients} <= tags


@ENGINES
def test_under_user_level_dp_alone_nothing_computed_from_a_clients_records_is_logged(synthetic, engine, caplog):
    """privacy=none with user-level DP: no per-client training metric, training-stage self.log or class count
    reaches a logger or the log; only the global model's validation metrics and the epsilons do."""
    logger = RecordingLogger()
    user = UserPrivacyConfig(enabled=True, noise_multiplier=1.0, clip=0.1)
    with caplog.at_level("INFO"):
        _, strategy = fit(synthetic, user, clients=4, fraction=1.0, sampling="uniform", rounds=2, engine=engine,
                          logger=logger)  # fmt: skip
    tags = {key for _, metrics in logger.records for key in metrics}
    assert tags and not [t for t in tags if t.startswith(("train/", "holdout/"))], tags
    assert "privacy/user_epsilon" in tags
    assert "Records per class" not in caplog.text
    assert not [line for line in caplog.text.splitlines() if "loss" in line and "client_" in line]
    if engine == "opacus":  # the module's training-stage self.log is withheld, by name
        assert strategy.withheld_logs
    report = privacy_report(strategy)
    assert report["released"][0].startswith("no record-level DP (privacy.enabled is false); under user-level DP")
