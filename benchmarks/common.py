"""What the benchmarks share: a quiet CPU Trainer that times each round's training."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch

from fl_dp_lightning import LitClassifier
from fl_dp_lightning.cli import RoundTimer
from fl_dp_lightning.strategy.federated_dp import FederatedRounds


def timed_fit(
    strategy: FederatedRounds,
    module: LitClassifier,
    datamodule: pl.LightningDataModule,
    rounds: int,
    devices: int = 1,
) -> list[float]:
    """Trains ``rounds`` rounds on the CPU without validation, logging or checkpoints; seconds per round.

    With several (spawned) processes the fit is timed from here as a whole, process start-up included.
    """
    timer = RoundTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=rounds,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[timer],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule)
    return timer.seconds if devices == 1 else [(time.perf_counter() - start) / rounds] * rounds


def synchronize(device: str) -> None:
    """Waits for the GPU's queued work, so that a timer reads what it ran."""
    if device == "cuda":
        torch.cuda.synchronize()
