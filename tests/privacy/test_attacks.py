"""The privacy audit's attacks, run against the defaults: each one identified records before and must fail now.

Each test runs the attack the way an adversary would and checks that it no longer distinguishes (or that what it
needs is refused). Where an unsafe opt-in restores the old behaviour, the same attack is shown to work there.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import TensorDataset

from fl_dp_lightning import FederatedDataModule, FederatedDPStrategy, FederatedProgressBar, PrivacyConfig

from ..conftest import RecordingLogger, make_trainer
from ..strategy.test_strategy import UnawareModule, small_classifier, weights


def release(synthetic, privacy, *, drop_record: bool = False, **trainer_kwargs):
    """The global model released by a 1-round run with run seed 0; ``drop_record`` replaces client a's record 0."""
    x, y = synthetic.train.tensors
    x, y = x[:400].clone(), y[:400].clone()
    if drop_record:
        x[0], y[0] = x[399], y[399]  # replace-one: the data set differs in one record
    datamodule = FederatedDataModule(
        train={"a": TensorDataset(x[:200], y[:200]), "b": TensorDataset(x[200:], y[200:])},
        test=synthetic.test,
        batch_size=40,
    )
    pl.seed_everything(0)
    module = small_classifier()
    make_trainer(FederatedDPStrategy(privacy=privacy, seed=0), 1, limit_val_batches=0, **trainer_kwargs).fit(
        module, datamodule
    )
    return torch.cat([w.flatten() for w in weights(module).values()])


@pytest.mark.parametrize("seeded", [True, False])
def test_replaying_the_run_with_its_known_seed_identifies_the_data_set_only_under_the_seeded_opt_in(synthetic, seeded):
    privacy = PrivacyConfig(noise_multiplier=1.0, unsafe_seeded_randomness=seeded)
    released = release(synthetic, privacy)  # trained on D
    # the adversary knows the seed, the code and every record but one: replays on D and on D'
    on_d = (release(synthetic, privacy) - released).norm().item()
    on_d_prime = (release(synthetic, privacy, drop_record=True) - released).norm().item()
    if seeded:
        assert on_d == 0.0 < on_d_prime  # exact replay: the adversary picks D with certainty
    else:
        # fresh secret noise: the replay on D is as far from the release as the replay on D'
        assert on_d > 0.5 * on_d_prime


class LogsEverything(UnawareModule):
    """Logs its private training loss everywhere Lightning offers, and reads raw gradients as the docs show."""

    def __init__(self) -> None:
        super().__init__()
        self.gradients_seen: list[object] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log_dict({"train_loss_dict": loss})
        return loss

    def on_before_optimizer_step(self, optimizer):  # Lightning's documented gradient-norm logging hook
        self.gradients_seen.append(self.body[1].weight.grad)

    def on_train_epoch_end(self):
        self.log("train_epoch_summary", torch.tensor(1.0))


@pytest.mark.parametrize("opt_in", [False, True])
def test_no_private_training_metric_or_raw_gradient_leaves_by_default(synthetic, caplog, opt_in):
    logger = RecordingLogger()
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=["a", "b"], batch_size=40)
    module = LogsEverything()
    privacy = PrivacyConfig(noise_multiplier=1.0, unsafe_release_training_metrics=opt_in)
    trainer = make_trainer(
        FederatedDPStrategy(privacy=privacy),
        2,
        logger=logger,
        callbacks=[FederatedProgressBar()],
        enable_progress_bar=True,
    )
    with caplog.at_level("INFO"), pytest.warns(UserWarning) if opt_in else _no_warning():
        trainer.fit(module, datamodule)
    logged = {key for _, metrics in logger.records for key in metrics}
    shown = set(trainer.progress_bar_metrics)
    private = {"train_loss", "train_loss_dict", "my_loss", "train_epoch_summary", "train_loss_step", "train_loss_epoch"}
    if opt_in:
        assert "train_loss_step" in logged and "train/loss/a" in logged
        assert all(isinstance(g, torch.Tensor) for g in module.gradients_seen)
        return
    # every logged tag and progress-bar entry is public: epsilon, validation on the shared set, the epoch
    assert all(key.startswith(("privacy/", "my_acc", "epoch")) for key in logged), logged
    assert not any(key.startswith("train") for key in shown | logged) and not private & (shown | logged)
    assert all(g is None for g in module.gradients_seen) and len(module.gradients_seen) > 0
    printed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[")]
    assert printed and not any("loss" in line for line in printed)
    assert "Not released" in caplog.text and "train_loss" in caplog.text  # the user learns why


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_per_example_gradients_are_cleared_after_every_step(synthetic):
    seen = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(
                [
                    getattr(p, "grad_sample", None) is None and getattr(p, "summed_grad", None) is None
                    for p in pl_module.parameters()
                ]
            )

    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=["a"], batch_size=40)
    make_trainer(FederatedDPStrategy(privacy=PrivacyConfig()), 1, callbacks=[Watch()]).fit(
        small_classifier(), datamodule
    )
    assert seen and all(all(step) for step in seen)


def test_clipping_norms_are_float32_under_bf16_mixed_precision(synthetic, monkeypatch):
    from opacus.optimizers import DPOptimizer

    clip_norms, real_clip = [], DPOptimizer.clip_and_accumulate

    def spy(self):
        dtypes = {g.dtype for g in self.grad_samples}
        # the clip factor as Opacus computes it (in the per-example gradients' dtype), the norm it yields in float64
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in self.grad_samples], 1).norm(2, dim=1)
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0).double()
        exact = torch.stack([g.reshape(len(g), -1).double().norm(dim=1) for g in self.grad_samples], 1).norm(dim=1)
        clip_norms.append((dtypes, float((factor * exact).max())))
        return real_clip(self)

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", spy)
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=["a"], batch_size=40)
    privacy = PrivacyConfig(max_grad_norm=0.1)
    make_trainer(FederatedDPStrategy(privacy=privacy), 1, precision="bf16-mixed").fit(small_classifier(), datamodule)
    assert clip_norms and all(dtypes == {torch.float32} for dtypes, _ in clip_norms)
    assert max(norm for _, norm in clip_norms) <= 0.1 * (1 + 1e-5)


def test_true_half_precision_is_refused_under_dp(synthetic):
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=["a"], batch_size=40)
    with pytest.raises(ValueError, match="precision='bf16-true': .*use precision='bf16-mixed'"):
        make_trainer(FederatedDPStrategy(), 1, precision="bf16-true").fit(small_classifier(), datamodule)
