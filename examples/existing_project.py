"""An existing Lightning project made federated and private by one line.

The module below is ordinary Lightning code (its own optimizer and scheduler, torchmetrics, self.log). The only
change for federated DP training is the `strategy=` line, with the data handed to FederatedDataModule (your
own data sets, split among named clients, or already one data set per client).

    python examples/existing_project.py [--fast]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from fl_dp_lightning import FederatedDataModule, FederatedDPStrategy, PrivacyConfig
from fl_dp_lightning.data.sources import DEBIAN_FASHION_MNIST, load_fashion_mnist, load_synthetic


class ExistingClassifier(pl.LightningModule):
    """A module written before federation was a thought."""

    def __init__(self, lr: float = 0.5):
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 10))
        self.val_acc = MulticlassAccuracy(10, average="micro")

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self.model(x), y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.7)}


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="synthetic data, 2 rounds")
    args = parser.parse_args(argv)
    fashion = not args.fast and DEBIAN_FASHION_MNIST.exists()
    source = load_fashion_mnist() if fashion else load_synthetic(2000, 500)
    data = FederatedDataModule(train=source.train, test=source.test, clients=["north", "south", "east"], batch_size=64)

    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=2 if args.fast else 5,
        strategy=FederatedDPStrategy(privacy=PrivacyConfig(noise_multiplier=1.0, max_grad_norm=1.0)),  # the line
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.fast,
    )
    model = ExistingClassifier()
    trainer.fit(model, data)
    accuracy = trainer.validate(model, data, verbose=False)[0]["val_acc"]
    print(f"validation accuracy {accuracy:.3f}; epsilon per client {trainer.strategy.epsilons()}")
    return accuracy


if __name__ == "__main__":
    main()
