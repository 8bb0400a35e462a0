"""A transformer project in the style of the UvA deep-learning course's tutorial 6 (its multi-head attention,
encoder block, warm-up cosine schedule and sequence-reversal task, written anew here), which imports the
standalone `pytorch_lightning` package. It trains federated and private with the strategy from
`fl_dp_lightning.pytorch_lightning`; its per-iteration learning-rate schedule restarts for each client's round,
so every client of a round follows the same schedule.

    python examples/pytorch_lightning_transformer.py [--fast]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fl_dp_lightning import PrivacyConfig
from fl_dp_lightning.data import ClientDatasets
from fl_dp_lightning.pytorch_lightning import FederatedDPStrategy


class MultiheadAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv_proj, self.o_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv_proj(x).reshape(batch, length, self.heads, 3 * self.head_dim).permute(0, 2, 1, 3)
        q, k, v = qkv.chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)  # within one record
        return self.o_proj((attention @ v).permute(0, 2, 1, 3).reshape(batch, length, dim))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.attention = MultiheadAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.Dropout(dropout), nn.ReLU(), nn.Linear(hidden, dim))
        self.norm1, self.norm2, self.dropout = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.attention(x)))
        return self.norm2(x + self.dropout(self.mlp(x)))


class PositionalEncoding(nn.Module):
    def __init__(self, dim: int, max_len: int = 64):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        div = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        pe = torch.zeros(max_len, dim)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(position * div), torch.cos(position * div)
        self.register_buffer("pe", pe.unsqueeze(0), persistent=False)  # constant: never changes in training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[:, : x.size(1)]


class CosineWarmupScheduler(torch.optim.lr_scheduler.LRScheduler):
    def __init__(self, optimizer: torch.optim.Optimizer, warmup: int, max_iters: int):
        self.warmup, self.max_iters = warmup, max_iters
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        factor = 0.5 * (1 + np.cos(np.pi * self.last_epoch / self.max_iters))
        if self.last_epoch <= self.warmup:
            factor *= self.last_epoch / self.warmup
        return [base_lr * factor for base_lr in self.base_lrs]


class ReversePredictor(pl.LightningModule):
    def __init__(self, num_classes: int = 10, dim: int = 32, heads: int = 2, lr: float = 3e-2, warmup: int = 10,
                 max_iters: int = 400):  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        self.input_net = nn.Linear(num_classes, dim)
        self.positional = PositionalEncoding(dim)
        self.encoder = EncoderBlock(dim, heads, 2 * dim)
        self.output_net = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.positional(self.input_net(F.one_hot(tokens, self.hparams.num_classes).float()))
        return self.output_net(self.encoder(x))

    def _step(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, labels = batch
        logits = self(tokens)
        # each record's loss is the mean over its positions; the batch's is the mean over records
        loss = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1).mean()
        return loss, (logits.argmax(-1) == labels).float().mean()

    def training_step(self, batch, batch_idx):
        loss, acc = self._step(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, acc = self._step(batch)
        self.log("val_acc", acc)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = CosineWarmupScheduler(optimizer, self.hparams.warmup, self.hparams.max_iters)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]


def reverse_task(size: int, length: int, num_classes: int, seed: int) -> TensorDataset:
    tokens = torch.randint(num_classes, (size, length), generator=torch.Generator().manual_seed(seed))
    return TensorDataset(tokens, tokens.flip(1))


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer sequences and rounds")
    args = parser.parse_args(argv)
    per_client, rounds, length, batch = (5000, 4, 4, 256) if args.fast else (20000, 5, 6, 256)
    clients = ClientDatasets(
        {name: reverse_task(per_client, length, 10, seed) for seed, name in enumerate("ab")}, batch
    )
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=rounds,
        strategy=FederatedDPStrategy(privacy=PrivacyConfig(noise_multiplier=0.5)),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.fast,
    )
    model = ReversePredictor(max_iters=rounds * per_client // batch)
    validation = DataLoader(reverse_task(500, length, 10, seed=99), batch_size=250)
    trainer.fit(model, train_dataloaders=clients, val_dataloaders=validation)
    accuracy = float(trainer.callback_metrics["val_acc"])
    print(f"validation accuracy {accuracy:.3f} (chance 0.1); epsilon per client {trainer.strategy.epsilons()}")
    return accuracy


if __name__ == "__main__":
    main()
