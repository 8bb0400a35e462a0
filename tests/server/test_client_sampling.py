"""Client sampling per round: a fraction or a count without replacement, or Poisson (each client independently)."""

from __future__ import annotations

import pytest
import torch

from fl_dp_lightning import ClientConfig, ConfigError, FederatedDataModule, FederatedDPStrategy, PrivacyConfig
from fl_dp_lightning.server.plan import plan_round

from ..conftest import make_trainer
from ..strategy.test_strategy import small_classifier

STEPS = {f"c{i}": 3 for i in range(50)}


def test_poisson_client_sampling_includes_each_client_at_its_rate_independently():
    rounds, q = 2000, 0.2
    chosen = torch.zeros(rounds, len(STEPS))
    for r in range(rounds):
        for name in plan_round(STEPS, q, r, seed=7, sampling="poisson").clients:
            chosen[r, int(name[1:])] = 1
    # mean inclusion: std sqrt(q (1 - q) / (50 * 2000)) = 0.0013, so 0.01 is ~8 standard deviations
    assert float(chosen.mean()) == pytest.approx(q, abs=0.01)
    # every client at rate q (std 0.009 per client over 2000 rounds; 0.05 is ~5.6 standard deviations)
    assert float((chosen.mean(0) - q).abs().max()) < 0.05
    # the number per round varies (Binomial(50, 0.2): variance 8), unlike uniform sampling
    assert float(chosen.sum(1).var()) == pytest.approx(50 * q * (1 - q), rel=0.15)
    # independence between clients: the correlation of two clients' inclusions is near 0
    assert abs(float(torch.corrcoef(chosen[:, :2].T)[0, 1])) < 0.1


def test_uniform_sampling_takes_exactly_the_count_each_round_and_every_client_equally_often():
    per_round = ClientConfig(count=50, names=[], per_round=5).round_fraction()
    counts = torch.zeros(len(STEPS))
    for r in range(1000):
        plan = plan_round(STEPS, per_round, r, seed=3)
        assert len(plan.clients) == 5
        counts[[int(n[1:]) for n in plan.clients]] += 1
    assert float((counts / 1000 - 0.1).abs().max()) < 0.04  # each client in 10 % of rounds


def test_a_round_without_any_sampled_client_is_skipped_and_the_others_are_accounted(synthetic, caplog):
    names, q, rounds, seed = ["a", "b", "c"], 0.3, 6, 11
    steps = {n: 1 for n in names}
    expected = {
        n: sum(n in plan_round(steps, q, r, seed, sampling="poisson").clients for r in range(rounds)) for n in names
    }
    empty = [r for r in range(rounds) if not plan_round(steps, q, r, seed, sampling="poisson").clients]
    assert empty, "the test's seed must leave a round without clients"
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=names, batch_size=40)
    strategy = FederatedDPStrategy(privacy=PrivacyConfig(), client_fraction=q, client_sampling="poisson", seed=seed)
    with caplog.at_level("INFO"):
        make_trainer(strategy, rounds).fit(small_classifier(), datamodule)
    for name, client in strategy.clients.items():
        assert client.steps_taken == expected[name] * client.steps_per_round
        assert sum(s for _, _, s in client.accountant.history) == client.steps_taken
    assert strategy.rounds_trained == rounds - len(empty)
    assert f"round {empty[0] + 1}: no client was sampled" in caplog.text


def test_bad_sampling_settings_are_refused():
    with pytest.raises(ConfigError, match="client.sampling='random'"):
        ClientConfig(sampling="random")
    with pytest.raises(ConfigError, match="client.per_round=3: must be in \\[1, client.count=2\\]"):
        ClientConfig(per_round=3)


def test_clients_a_partition_leaves_below_the_batch_size_are_refused_or_dropped_by_option(synthetic, caplog):
    def datamodule(drop: bool) -> FederatedDataModule:
        return FederatedDataModule(
            train=synthetic.train, test=synthetic.test, clients=12, partition="quantity", quantity_sigma=2.0,
            batch_size=64, drop_small_clients=drop,
        )  # fmt: skip

    small = [name for name, size in _sizes(datamodule(False)).items() if size < 64]
    assert small, "the test's skew must leave some clients small"
    with pytest.raises(ConfigError, match="fewer than the batch size 64: .*client.drop_small=true"):
        make_trainer(FederatedDPStrategy(), 1).fit(small_classifier(), datamodule(False))
    strategy = FederatedDPStrategy()
    with caplog.at_level("INFO"):
        make_trainer(strategy, 1, limit_val_batches=0).fit(small_classifier(), datamodule(True))
    assert set(strategy.clients).isdisjoint(small) and len(strategy.clients) == 12 - len(small)
    assert f"left out {len(small)} clients below the batch size" in caplog.text


def _sizes(module: FederatedDataModule) -> dict[str, int]:
    module.setup("fit")
    return module.client_sizes()
