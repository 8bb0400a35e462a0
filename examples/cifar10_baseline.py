"""The CIFAR-10 ResNet baseline of Lightning's tutorials, federated and private by its Trainer's strategy line.

The module has the tutorial's shape (Lightning-AI/tutorials, lightning_examples/cifar10-baseline/baseline.py at
commit 12cfdb76cb3039e63174d7dace1d2cfe7b70cd8d, Apache-2.0; written anew here): torchvision's ResNet-18 with a
3x3 stem and no max-pool, log-softmax and NLL loss, SGD with momentum 0.9 and weight decay 5e-4 under a per-step
OneCycleLR, `self.log` of loss and accuracy. Its BatchNorms and in-place residual additions are what
`privacy.fix_modules=True` replaces (GroupNorm, out-of-place blocks), as Opacus's `ModuleValidator.fix` would.

The tutorial downloads CIFAR-10 through lightning-bolts; here the images are 3x32x32 tensors of the same shape
(synthetic, offline), split among three clients by FederatedDataModule.

    python examples/cifar10_baseline.py [--fast]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.callbacks import LearningRateMonitor
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR
from torch.utils.data import TensorDataset
from torchmetrics.functional import accuracy

from fl_dp_lightning import FederatedDataModule, FederatedDPStrategy, PrivacyConfig

BATCH_SIZE = 64


def create_model() -> nn.Module:
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
    model.maxpool = nn.Identity()
    return model


class LitResnet(pl.LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.model = create_model()

    def forward(self, x):
        return F.log_softmax(self.model(x), dim=1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.nll_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def evaluate(self, batch, stage=None):
        x, y = batch
        logits = self(x)
        loss = F.nll_loss(logits, y)
        acc = accuracy(torch.argmax(logits, dim=1), y, task="multiclass", num_classes=10)
        if stage:
            self.log(f"{stage}_loss", loss, prog_bar=True)
            self.log(f"{stage}_acc", acc, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self.evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self.evaluate(batch, "test")

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4)
        steps_per_epoch = 45000 // BATCH_SIZE
        scheduler = OneCycleLR(optimizer, 0.1, epochs=self.trainer.max_epochs, steps_per_epoch=steps_per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def cifar_shaped(n: int, seed: int, side: int = 32) -> TensorDataset:
    """``n`` learnable 3 x side x side images of 10 classes (a colour template per class plus noise)."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, 3, side, side, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (n,), generator=gen)
    return TensorDataset(templates[y] + torch.randn(n, 3, side, side, generator=gen), y)


def main(argv: list[str] | None = None) -> pl.Trainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a few 8x8 images, 1 round")
    args = parser.parse_args(argv)
    if args.fast:  # the same network on a few small images in small batches: a CPU test's time
        train, test, batch_size = cifar_shaped(24, 1, side=8), cifar_shaped(40, 2, side=8), 4
    else:
        train, test, batch_size = cifar_shaped(3000, 1), cifar_shaped(500, 2), BATCH_SIZE // 4
    data = FederatedDataModule(train=train, test=test, clients=["north", "south", "east"], batch_size=batch_size)
    pl.seed_everything(7)
    model = LitResnet(lr=0.05)
    trainer = pl.Trainer(
        max_epochs=1 if args.fast else 5,
        accelerator="auto",
        strategy=FederatedDPStrategy(privacy=PrivacyConfig(fix_modules=True)),  # the line
        callbacks=[LearningRateMonitor(logging_interval="step")],
        enable_checkpointing=False,
        enable_progress_bar=not args.fast,
    )
    trainer.fit(model, data)
    trainer.test(model, datamodule=data, verbose=not args.fast)
    print(f"epsilon per client {trainer.strategy.epsilons()}")
    return trainer


if __name__ == "__main__":
    main()
