"""The dataset-agnostic `LitModel` of Lightning's data-module tutorial, federated and private by its Trainer's
strategy line.

The module has the tutorial's shape (Lightning-AI/tutorials, lightning_examples/datamodules/datamodules.py at
commit 12cfdb76cb3039e63174d7dace1d2cfe7b70cd8d, Apache-2.0; written anew here): built from the data's
channels, width, height and class count, an MLP with dropout, log-softmax and NLL loss, Adam at 2e-4, a
`training_step(self, batch)` without `batch_idx` (Lightning allows it), validation loss and accuracy in
`self.log`. The tutorial's MNISTDataModule downloads MNIST; the data module here has its shape (`dims`,
`num_classes`) and reads MNIST from `data/` or, offline, the real MNIST test digits shipped with fl_dp_lightning,
split among two hospitals.

    python examples/datamodules_tutorial.py [--fast]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional import accuracy

from fl_dp_lightning import FederatedDataModule, FederatedDPStrategy, PrivacyConfig


class MNISTDataModule(FederatedDataModule):
    """The tutorial's data module, its records split among clients; ``dims`` and ``num_classes`` as it has them."""

    def __init__(self, batch_size: int = 64):
        super().__init__(source="mnist", clients=["st_marys", "city_general"], batch_size=batch_size)
        self.dims = (1, 28, 28)
        self.num_classes = 10

    def size(self) -> tuple[int, int, int]:
        return self.dims


class LitModel(pl.LightningModule):
    def __init__(self, channels, width, height, num_classes, hidden_size=64, learning_rate=2e-4):
        super().__init__()
        self.channels, self.width, self.height = channels, width, height
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        self.learning_rate = learning_rate
        self.model = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * width * height, hidden_size),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(hidden_size, num_classes),
        )

    def forward(self, x):
        return F.log_softmax(self.model(x), dim=1)

    def training_step(self, batch):
        x, y = batch
        return F.nll_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.nll_loss(logits, y)
        acc = accuracy(torch.argmax(logits, dim=1), y, task="multiclass", num_classes=self.num_classes)
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_acc", acc, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.learning_rate)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="2 rounds")
    args = parser.parse_args(argv)
    pl.seed_everything(0)
    dm = MNISTDataModule()
    model = LitModel(*dm.size(), dm.num_classes)
    trainer = pl.Trainer(
        max_epochs=2 if args.fast else 5,
        accelerator="auto",
        strategy=FederatedDPStrategy(privacy=PrivacyConfig(noise_multiplier=1.0)),  # the line
        enable_progress_bar=not args.fast,
    )
    trainer.fit(model, dm)
    accuracy_now = float(trainer.callback_metrics["val_acc"])
    print(f"validation accuracy {accuracy_now:.3f}; epsilon per client {trainer.strategy.epsilons()}")
    return accuracy_now


if __name__ == "__main__":
    main()
