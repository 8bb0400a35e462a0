"""Each client's held-out records: a seeded split, and the global model evaluated on them after every round
(released only where training metrics are)."""

from __future__ import annotations

import pytest
import torch

from fl_dp_lightning import FederatedDataModule, FederatedDPStrategy, LitClassifier, PrivacyConfig
from fl_dp_lightning.data.partition import holdout_split

from ..conftest import RecordingLogger, make_trainer
from ..strategy.test_strategy import small_classifier


def test_the_holdout_split_is_seeded_disjoint_and_complete():
    train, held = holdout_split(101, 0.2, seed=3)
    assert len(held) == 20 and len(train) == 81
    assert sorted(torch.cat([train, held]).tolist()) == list(range(101))
    assert torch.equal(holdout_split(101, 0.2, seed=3)[1], held)
    assert not torch.equal(holdout_split(101, 0.2, seed=4)[1], held)
    assert len(holdout_split(5, 0.01, 0)[1]) == 1 and len(holdout_split(5, 0.0, 0)[1]) == 0


def fit(synthetic, privacy):
    datamodule = FederatedDataModule(
        train=synthetic.train, test=synthetic.test, clients=["a", "b"], batch_size=30, holdout_fraction=0.25
    )
    logger = RecordingLogger()
    module = LitClassifier(small_classifier().net)
    strategy = FederatedDPStrategy(privacy=privacy)
    make_trainer(strategy, 2, logger=logger).fit(module, datamodule)
    return module, datamodule, logger


def test_the_global_model_is_evaluated_on_each_clients_holdout_after_every_round(synthetic):
    module, datamodule, logger = fit(synthetic, PrivacyConfig(enabled=False))
    assert {n: len(d) for n, d in datamodule.client_datasets.items()} == {"a": 450, "b": 450}
    assert {n: len(d) for n, d in datamodule.client_holdouts.items()} == {"a": 150, "b": 150}
    module.eval()
    for name, held in datamodule.client_holdouts.items():
        series = logger.series(f"holdout/acc/{name}")
        assert sorted(series) == [0, 1]
        x, y = held.tensors
        with torch.no_grad():
            expected = (module(x).argmax(-1) == y).float().mean().item()
        assert series[1] == pytest.approx(expected, abs=1e-6)  # the final global model, by hand
        assert sorted(logger.series(f"holdout/loss/{name}")) == [0, 1]


def test_under_dp_holdout_metrics_stay_in_unless_training_metrics_are_released(synthetic):
    _, _, logger = fit(synthetic, PrivacyConfig(noise_multiplier=1.0))
    assert not any(key.startswith("holdout/") for _, metrics in logger.records for key in metrics)
    _, _, logger = fit(synthetic, PrivacyConfig(noise_multiplier=1.0, unsafe_release_training_metrics=True))
    assert logger.series("holdout/acc/a")
