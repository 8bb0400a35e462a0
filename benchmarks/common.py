"""What the benchmarks share: a quiet CPU Trainer that times each round's training."""

from __future__ import annotations

import lightning.pytorch as pl

from fl_dp_lightning import FederatedDPStrategy, LitClassifier
from fl_dp_lightning.cli import RoundTimer


def timed_fit(
    strategy: FederatedDPStrategy, module: LitClassifier, datamodule: pl.LightningDataModule, rounds: int
) -> list[float]:
    """Trains ``rounds`` rounds on the CPU without validation, logging or checkpoints; seconds per round."""
    timer = RoundTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_epochs=rounds,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule)
    return timer.seconds
