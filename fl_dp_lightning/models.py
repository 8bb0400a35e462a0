"""The seed's CNN and a LightningModule classifier that wraps any network.

Neither knows anything of federation or privacy: the strategy does all of that.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy


def seed_cnn(num_classes: int = 10) -> nn.Sequential:
    """The CNN of the PySyft + Opacus tutorial, for 1x28x28 inputs (26,010 parameters with 10 classes)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 8, stride=2, padding=3),
        nn.ReLU(),
        nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, stride=2),
        nn.ReLU(),
        nn.MaxPool2d(2, 1),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, num_classes),
    )


class LitClassifier(pl.LightningModule):
    """Cross-entropy classifier with torchmetrics accuracy and SGD.

    Args:
        net: the network; ``None`` builds :func:`seed_cnn`.
        num_classes: number of classes.
        lr: SGD learning rate.
        momentum: SGD momentum.
    """

    def __init__(self, net: nn.Module | None = None, *, num_classes: int = 10, lr: float = 0.1, momentum: float = 0.0):
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net if net is not None else seed_cnn(num_classes)
        self.loss = nn.CrossEntropyLoss()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        acc = self.train_acc(logits.detach(), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", acc, on_step=False, on_epoch=True)
        return {"loss": loss, "acc": acc}

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        metric.update(logits, y)
        self.log(f"{stage}/loss", self.loss(logits, y), prog_bar=stage == "val")
        self.log(f"{stage}/acc", metric, prog_bar=stage == "val")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)
