"""A lightning-hydra-template style project (its MNISTLitModule and SimpleDenseNet, written anew here) made
federated and private without editing the module.

The template's network uses BatchNorm1d, which DP-SGD cannot train (it mixes the records of a batch); the
strategy refuses it with the fix, and `privacy.fix_modules=True` replaces each BatchNorm1d with GroupNorm(1, C)
(per-record normalisation over the features), with a warning that the model changed. The module stores its network
in hparams, as the template does: Opacus's per-sample buffers never reach the checkpoint.

    python examples/hydra_template_mnist.py [--fast]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from fl_dp_lightning import FederatedDataModule, FederatedDPStrategy, PrivacyConfig


class SimpleDenseNet(nn.Module):
    def __init__(self, input_size: int = 784, lin1: int = 64, lin2: int = 128, lin3: int = 64, output: int = 10):
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(input_size, lin1), nn.BatchNorm1d(lin1), nn.ReLU(),
            nn.Linear(lin1, lin2), nn.BatchNorm1d(lin2), nn.ReLU(),
            nn.Linear(lin2, lin3), nn.BatchNorm1d(lin3), nn.ReLU(),
            nn.Linear(lin3, output),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.flatten(1))


class MNISTLitModule(pl.LightningModule):
    """The template's module: net and optimizer factory in, metrics and a plateau scheduler on val/loss."""

    def __init__(self, net: nn.Module, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.net = net
        self.criterion = nn.CrossEntropyLoss()
        self.train_acc, self.val_acc = MulticlassAccuracy(10, average="micro"), MulticlassAccuracy(10, average="micro")
        self.train_loss, self.val_loss, self.val_acc_best = MeanMetric(), MeanMetric(), MaxMetric()

    def model_step(self, batch):
        x, y = batch
        logits = self.net(x)
        return self.criterion(logits, y), logits.argmax(1), y

    def training_step(self, batch, batch_idx):
        loss, preds, targets = self.model_step(batch)
        self.train_loss(loss)
        self.train_acc(preds, targets)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, preds, targets = self.model_step(batch)
        self.val_loss(loss)
        self.val_acc(preds, targets)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self):
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True, prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss"}}


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="synthetic data, 2 rounds")
    args = parser.parse_args(argv)
    data = FederatedDataModule(source="synthetic" if args.fast else "mnist", clients=["alice", "bob"], batch_size=64)
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=2 if args.fast else 5,
        strategy=FederatedDPStrategy(privacy=PrivacyConfig(fix_modules=True)),  # the only change
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.fast,
    )
    model = MNISTLitModule(SimpleDenseNet())
    trainer.fit(model, data)
    accuracy = float(trainer.callback_metrics["val/acc"])
    print(f"validation accuracy {accuracy:.3f}; epsilon per client {trainer.strategy.epsilons()}")
    return accuracy


if __name__ == "__main__":
    main()
