"""Checkpoints carry the privacy spent: kill-and-resume equals an uninterrupted run."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from fl_dp_lightning import FederatedDataModule, FederatedDPStrategy, PrivacyConfig

from .conftest import make_trainer
from .test_strategy import small_classifier, weights

PRIVACY = PrivacyConfig(noise_multiplier=1.0)


def fit(synthetic, rounds, *, privacy=PRIVACY, ckpt_dir=None, ckpt_path=None, fraction=1.0):
    pl.seed_everything(0)
    module = small_classifier()
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=["a", "b", "c"], batch_size=32)
    strategy = FederatedDPStrategy(privacy=privacy, client_fraction=fraction, seed=5)
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0)] if ckpt_dir else []
    trainer = make_trainer(strategy, rounds, enable_checkpointing=bool(ckpt_dir), callbacks=callbacks)
    trainer.fit(module, datamodule, ckpt_path=ckpt_path)
    return module, strategy


@pytest.mark.parametrize("fraction", [1.0, 2 / 3])
def test_kill_after_round_2_and_resume_to_round_5_equals_the_uninterrupted_run(synthetic, tmp_path, fraction):
    full_module, full = fit(synthetic, 5, fraction=fraction)
    fit(synthetic, 2, ckpt_dir=tmp_path, fraction=fraction)  # the run that was killed after round 2
    resumed_module, resumed = fit(synthetic, 5, ckpt_dir=tmp_path, ckpt_path=tmp_path / "last.ckpt", fraction=fraction)

    for key, value in weights(full_module).items():
        assert torch.allclose(weights(resumed_module)[key], value, atol=1e-6, rtol=0), key
    assert resumed.epsilons() == full.epsilons()  # exact
    for name in full.clients:
        assert resumed.clients[name].accountant.history == full.clients[name].accountant.history


def test_a_checkpoint_made_with_other_privacy_settings_is_refused(synthetic, tmp_path):
    fit(synthetic, 1, ckpt_dir=tmp_path)
    other = PrivacyConfig(noise_multiplier=0.5)
    with pytest.raises(
        ValueError, match="privacy: checkpoint .*'noise_multiplier': 1.0.* != now .*'noise_multiplier': 0.5"
    ):
        fit(synthetic, 2, privacy=other, ckpt_dir=tmp_path, ckpt_path=tmp_path / "last.ckpt")


def test_a_checkpoint_without_federated_state_is_refused(synthetic, tmp_path):
    path = tmp_path / "plain.ckpt"
    fit(synthetic, 1, ckpt_dir=tmp_path)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    del checkpoint["fl_dp_lightning"]
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="not written by FederatedDPStrategy"):
        fit(synthetic, 2, ckpt_dir=tmp_path, ckpt_path=path)


def test_a_checkpoint_write_that_dies_halfway_leaves_the_previous_checkpoint_intact(synthetic, tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileOpener

    _, strategy = fit(synthetic, 1, ckpt_dir=tmp_path)
    path = tmp_path / "last.ckpt"
    before = path.read_bytes()
    real_write = LocalFileOpener.write

    def dies_halfway(self, data):
        real_write(self, data[: len(data) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(LocalFileOpener, "write", dies_halfway)
    with pytest.raises(OSError, match="No space left"):
        strategy.lightning_module.trainer.save_checkpoint(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]  # no partial file left beside it
