"""Two CPU processes (gloo) give the same global weights and epsilons as one process."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from fl_dp_lightning import FederatedDataModule, FederatedDPStrategy, PrivacyConfig
from fl_dp_lightning.strategy.distributed import DistributedFederatedDPStrategy

from ..conftest import make_trainer
from .test_strategy import small_classifier, split, weights

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def run(synthetic, strategy, devices, root):
    parts = split(synthetic.train, [300, 500, 400])  # unequal: ranks get shares of different lengths
    datamodule = FederatedDataModule(train=dict(zip("abc", parts)), test=synthetic.test, batch_size=40)
    pl.seed_everything(0)
    module = small_classifier()
    trainer = make_trainer(
        strategy, 3, devices=devices, limit_val_batches=0, use_distributed_sampler=False, default_root_dir=str(root)
    )
    trainer.fit(module, datamodule)
    report = json.loads((Path(root) / "privacy_report.json").read_text())
    return module, {name: row["epsilon"] for name, row in report["clients"].items()}, report


def test_two_gloo_processes_equal_one_process(synthetic, tmp_path):
    privacy = PrivacyConfig(noise_multiplier=1.0, unsafe_seeded_randomness=True)  # the same noise in both
    one_module, one_eps, _ = run(synthetic, FederatedDPStrategy(privacy=privacy, seed=3), 1, tmp_path / "one")
    two = DistributedFederatedDPStrategy(privacy=privacy, seed=3, start_method="spawn", process_group_backend="gloo")
    two_module, two_eps, report = run(synthetic, two, 2, tmp_path / "two")

    for key, value in weights(one_module).items():
        assert torch.allclose(weights(two_module)[key], value, atol=1e-5, rtol=0), key
    assert two_eps == pytest.approx(one_eps, abs=1e-12)
    assert {name: row["steps"] for name, row in report["clients"].items()} == {"a": 21, "b": 36, "c": 30}


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_a_checkpoint_from_two_processes_resumes_in_one_exactly(synthetic, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    privacy = PrivacyConfig(noise_multiplier=1.0, unsafe_seeded_randomness=True)  # bit-exact resume needs it
    parts = split(synthetic.train, [300, 500, 400])

    def fit(strategy, rounds, devices=1, ckpt_path=None, save=False):
        datamodule = FederatedDataModule(train=dict(zip("abc", parts)), test=synthetic.test, batch_size=40)
        pl.seed_everything(0)
        module = small_classifier()
        callbacks = [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)] if save else []
        trainer = make_trainer(
            strategy,
            rounds,
            devices=devices,
            limit_val_batches=0,
            use_distributed_sampler=False,
            enable_checkpointing=save,
            callbacks=callbacks,
        )
        trainer.fit(module, datamodule, ckpt_path=ckpt_path)
        return module, trainer.strategy

    two = DistributedFederatedDPStrategy(privacy=privacy, seed=3, start_method="spawn", process_group_backend="gloo")
    fit(two, 2, devices=2, save=True)  # written once, by rank 0, with every client's state
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert set(checkpoint["fl_dp_lightning"]["clients"]) == {"a", "b", "c"}
    resumed, resumed_strategy = fit(
        FederatedDPStrategy(privacy=privacy, seed=3), 3, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    full, full_strategy = fit(FederatedDPStrategy(privacy=privacy, seed=3), 3)
    for key, value in weights(full).items():
        assert torch.allclose(weights(resumed)[key], value, atol=1e-5, rtol=0), key
    assert resumed_strategy.epsilons() == full_strategy.epsilons()
