"""The seed's CNN and a LightningModule classifier that wraps any network.

Neither knows anything of federation or privacy: the strategy does all of that.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from torchvision.models.resnet import ResNet

from fl_dp_lightning.config import ConfigError
from fl_dp_lightning.privacy.layers import OutOfPlaceBasicBlock

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
"""The seed CNN's activations: ``tanh`` is the tempered sigmoid of Papernot et al. (2021), bounded, which keeps
activations (and so per-example gradients) from exploding under DP-SGD's clipping."""


def seed_cnn(num_classes: int = 10, activation: str = "relu") -> nn.Sequential:
    """The CNN of the PySyft + Opacus tutorial, for 1x28x28 inputs (26,010 parameters with 10 classes).

    Args:
        num_classes: output classes.
        activation: ``relu`` (the seed's) or ``tanh`` (tempered sigmoid).
    """
    act = ACTIVATIONS[activation]
    return nn.Sequential(
        nn.Conv2d(1, 16, 8, stride=2, padding=3),
        act(),
        nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, stride=2),
        act(),
        nn.MaxPool2d(2, 1),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 32),
        act(),
        nn.Linear(32, num_classes),
    )


def scatternet_linear(num_classes: int = 10, channels: int = 81, size: int = 7, groups: int = 27) -> nn.Sequential:
    """GroupNorm and a linear classifier on ScatterNet features (``data.features=scatternet``; Tramer and Boneh
    2021): 39,862 parameters with the defaults, for the 81x7x7 features of a 28x28 image.

    Args:
        num_classes: output classes.
        channels: feature channels (81 for a 1-channel image, J = 2).
        size: feature height and width (the image's divided by 4).
        groups: GroupNorm groups (normalizes each record's own features, so DP-SGD's per-record bound holds).
    """
    return nn.Sequential(nn.GroupNorm(groups, channels), nn.Flatten(), nn.Linear(channels * size * size, num_classes))


def resnet18_groupnorm(num_classes: int = 10, in_channels: int = 3, groups: int = 32) -> ResNet:
    """torchvision's ResNet-18 made trainable with DP-SGD: GroupNorm, no in-place operations.

    Args:
        num_classes: output classes.
        in_channels: input channels (1 for MNIST-like images; the stem is then a 3x3 convolution).
        groups: GroupNorm groups (at most the channel count of each layer).
    """
    model = ResNet(
        OutOfPlaceBasicBlock,
        [2, 2, 2, 2],
        num_classes=num_classes,
        norm_layer=lambda c: nn.GroupNorm(min(groups, c), c),
    )
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return model


class LitClassifier(pl.LightningModule):
    """Cross-entropy classifier with torchmetrics accuracy and SGD.

    Args:
        net: the network; ``None`` builds :func:`seed_cnn`.
        num_classes: number of classes.
        lr: SGD learning rate.
        momentum: SGD momentum.
        activation: the seed CNN's activation when ``net`` is ``None``: ``relu`` or ``tanh``.
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        *,
        num_classes: int = 10,
        lr: float = 0.1,
        momentum: float = 0.0,
        activation: str = "relu",
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"model.activation={activation!r}: choose one of {tuple(ACTIVATIONS)}")
        for key, value, valid, rule in (
            ("lr", lr, lambda v: 0 < v < math.inf, "must be a number > 0, e.g. 0.1"),
            ("momentum", momentum, lambda v: 0 <= v < 1, "must be a number in [0, 1), e.g. 0.9"),
            ("num_classes", num_classes, lambda v: v >= 2 and float(v).is_integer(), "must be an integer >= 2"),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
                raise ConfigError(f"model.{key}={value!r}: {rule}")
        self.save_hyperparameters(ignore=["net"])
        self.net = net if net is not None else seed_cnn(num_classes, activation)
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
