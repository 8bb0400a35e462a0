"""Lightning's own autoencoder example (its LitAutoEncoder, written anew here) driven by LightningCLI, with a
project's FederatedDataModule subclass: LightningCLI configures both from the command line, the strategy makes
the run federated and private, and `predict` reconstructs the shared test set.

    python examples/lightning_cli_autoencoder.py fit --trainer.max_epochs=3 --data.clients=4
    python examples/lightning_cli_autoencoder.py fit --data.source=synthetic --trainer.max_epochs=1

(LightningCLI needs jsonargparse: pip install "jsonargparse[signatures]".)
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import nn

from fl_dp_lightning import FederatedDataModule


class LitAutoEncoder(pl.LightningModule):
    def __init__(self, hidden_dim: int = 64, lr: float = 0.5):
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(nn.Linear(28 * 28, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 3))
        self.decoder = nn.Sequential(nn.Linear(3, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 28 * 28))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x.flatten(1)))

    def training_step(self, batch, batch_idx):
        x, _ = batch
        loss = F.mse_loss(self(x), x.flatten(1))
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        self.log("val_loss", F.mse_loss(self(x), x.flatten(1)))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class ClinicImages(FederatedDataModule):
    """A project's own data module: its constructor arguments are what LightningCLI exposes as --data.*."""

    def __init__(self, source: str = "mnist", clients: int = 3, batch_size: int = 64):
        super().__init__(source=source, clients=clients, batch_size=batch_size)


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(
        LitAutoEncoder,
        ClinicImages,
        args=args,
        seed_everything_default=0,
        # the registered name: FederatedDPStrategy with its defaults (the seed's noise 1.2, clip 1.0, delta 1e-5)
        trainer_defaults={"strategy": "federated_dp", "log_every_n_steps": 10},
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
