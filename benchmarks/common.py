"""What the benchmarks share: a quiet Trainer that times each round's training, saving results, plotting."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, Dataset

from fl_dp_lightning import LitClassifier
from fl_dp_lightning.cli import RoundTimer
from fl_dp_lightning.strategy.federated_dp import FederatedRounds


def quiet_trainer(
    strategy: FederatedRounds, rounds: int, *, device: str = "cpu", devices: int = 1, validate: bool = False
) -> pl.Trainer:
    """A Trainer without logging, checkpoints or progress bar, validating only when asked, that times each round
    (its :class:`RoundTimer` is ``trainer.callbacks``' first)."""
    return pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=rounds,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1.0 if validate else 0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=[RoundTimer()],
    )


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
    trainer = quiet_trainer(strategy, rounds, devices=devices)
    start = time.perf_counter()
    trainer.fit(module, datamodule)
    return trainer.callbacks[0].seconds if devices == 1 else [(time.perf_counter() - start) / rounds] * rounds


def opacus_local_epoch(
    model: torch.nn.Module, dataset: Dataset, *, lr: float, batch: int, noise: float, clip: float, device: str = "cpu"
) -> tuple[dict[str, torch.Tensor], int, float]:
    """One client's local epoch as the seed tutorial writes it: SGD, a DataLoader and Opacus's PrivacyEngine
    (Poisson batches of expected size ``batch``) on a copy of ``model``.

    Returns the trained state dict, the steps taken and the seconds of the training loop alone.
    """
    model = copy.deepcopy(model).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(dataset, batch_size=batch)
    model, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise, max_grad_norm=clip
    )
    criterion, steps = torch.nn.CrossEntropyLoss(), 0
    start = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
        steps += 1
    synchronize(device)
    return model._module.state_dict(), steps, time.perf_counter() - start


def synchronize(device: str) -> None:
    """Waits for the GPU's queued work, so that a timer reads what it ran."""
    if device == "cuda":
        torch.cuda.synchronize()


def save_json(path: Path, payload: dict[str, Any]) -> None:
    """Writes ``payload`` as indented JSON to ``path`` (its folder made), and says where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"saved {path}")


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or ``None`` (said once) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Lays out and writes a matplotlib figure, and says where."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"saved {path}")


def machine_info() -> dict[str, str]:
    """Where a benchmark ran: platform, processor and torch version."""
    import platform

    return {"machine": platform.platform(), "processor": platform.processor(), "torch": torch.__version__}
