"""The sensitivity probe refuses, before any step, modules that let one record move the clipped sum by more than
max_grad_norm (the audit measured 12x, 2x, 4x and 1.12x), and accepts modules that keep records apart."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from torch import nn

from fl_dp_lightning import FederatedDataModule, FederatedDPStrategy, LitClassifier, PrivacyConfig
from fl_dp_lightning.privacy.probe import check_sensitivity, random_batch_like
from fl_dp_lightning.runtime.sampling import take_batch

from ..conftest import make_trainer
from ..strategy.test_strategy import UnawareModule, small_classifier, weights


class BatchMeanLogits(UnawareModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.body(x)
        return F.cross_entropy(logits - logits.mean(0, keepdim=True), y)


class InBatchMixup(UnawareModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        partner = torch.randperm(len(x))
        return F.cross_entropy(self.body(0.7 * x + 0.3 * x[partner]), y)


class FoldedRecords(UnawareModule):
    """Each 28x28 image becomes 4 rows of the batch: one record counts as four."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(196, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.body(x.reshape(len(x) * 4, 196)).reshape(len(x), 4, 10).mean(1)
        return F.cross_entropy(logits, y)


class RegularizerInTheLoss(UnawareModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.body(x), y) + 10 * self.body[1].weight.pow(2).sum()


class SumLoss(UnawareModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.body(x), y, reduction="sum")


class RunningDataMean(UnawareModule):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("data_mean", torch.zeros(784))

    def training_step(self, batch, batch_idx):
        self.data_mean.copy_(batch[0].flatten(1).mean(0))
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(
    ("module", "privacy", "message"),
    [
        (BatchMeanLogits, {}, "removing one record of a batch of 32 changed the other records' per-example gradients"),
        (InBatchMixup, {}, "mixes records of a batch .* mixup"),
        (FoldedRecords, {}, "for a batch of 32 records: the forward folds records into the batch axis"),
        (UnawareModule, {"loss_reduction": "sum"}, "reduces over the batch by mean, .*set privacy.loss_reduction=mean"),
        (SumLoss, {}, "reduces over the batch by sum, .*set privacy.loss_reduction=sum"),
        (RegularizerInTheLoss, {}, "depends on the parameters alone .*weight_decay"),
        (RunningDataMean, {}, r"buffers \['data_mean'\] change during training_step"),
    ],
)
def test_modules_that_break_per_example_sensitivity_are_refused_before_any_privacy_is_spent(
    synthetic, module, privacy, message
):
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=2, batch_size=32)
    instance = module()
    before = weights(instance)
    strategy = FederatedDPStrategy(privacy=PrivacyConfig(**privacy))
    with pytest.raises(ValueError, match=message):
        make_trainer(strategy, 1).fit(instance, datamodule)
    assert all(torch.equal(before[k], v) for k, v in weights(instance).items())  # nothing trained
    assert all(not c.accountant.history for c in strategy.clients.values())  # nothing spent


class WithDropout(UnawareModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.Tanh(), nn.Dropout(0.3), nn.Linear(64, 10))


@pytest.mark.parametrize(
    "make",
    [LitClassifier, small_classifier, UnawareModule, WithDropout, lambda: SumLoss()],
    ids=["seed_cnn", "small", "unaware", "dropout", "sum_loss_with_sum_reduction"],
)
def test_modules_that_keep_records_apart_pass_the_probe_and_train(synthetic, make):
    privacy = PrivacyConfig(loss_reduction="sum" if make().__class__ is SumLoss else "mean")
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=2, batch_size=32)
    strategy = FederatedDPStrategy(privacy=privacy)
    module = make()
    make_trainer(strategy, 1, limit_val_batches=0).fit(module, datamodule)
    assert all(c.accountant.history for c in strategy.clients.values())


def test_the_probe_leaves_no_trace_in_the_users_metrics_or_weights(synthetic):
    module = LitClassifier()
    before = weights(module)
    wrapped = GradSampleModule(module, batch_first=True, loss_reduction="mean", strict=True)
    module.log = lambda *a, **k: None
    template = take_batch(synthetic.train, [])
    generator = torch.Generator().manual_seed(0)
    check_sensitivity(
        module,
        lambda b: module.training_step(b, 0),
        lambda size: random_batch_like(template, size, generator, 10),
        sizes=[6, 32],
        loss_reduction="mean",
    )
    wrapped._close()
    assert all(torch.equal(before[k], v) for k, v in weights(module).items())
    assert module.train_acc.update_count == 0  # the probe's random records are not counted
    assert all(p.grad is None for p in module.parameters())
