"""Evaluating the global model on one client's held-out records with the module's own ``validation_step``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.data import extract_batch_size
from torch.utils.data import Dataset
from torchmetrics import Metric

from fl_dp_lightning.runtime.sampling import take_batch


def evaluate_on(
    module: pl.LightningModule, dataset: Dataset, *, batch_size: int, to_device: Callable[[Any], Any]
) -> dict[str, float]:
    """Runs ``module.validation_step`` over ``dataset`` in eval mode without gradients and returns what it logs:
    scalars averaged over records (weighted by batch size), torchmetrics objects computed (and reset, so that the
    module's own validation starts clean). A ``val/`` prefix is dropped from the names."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    metrics: dict[str, Metric] = {}
    size = 0

    def capture(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(value, Metric):
            metrics[name] = value
        else:
            sums[name] = sums.get(name, 0.0) + float(value) * size
            counts[name] = counts.get(name, 0) + size

    guard, training = module.__dict__.get("log"), module.training
    module.log = capture  # the Lightning loop that would collect these logs is not running
    module.eval()
    try:
        for metric in _metrics(module):
            metric.reset()
        with torch.no_grad():
            for batch_idx, start in enumerate(range(0, len(dataset), batch_size)):
                batch = to_device(take_batch(dataset, range(start, min(start + batch_size, len(dataset)))))
                size = extract_batch_size(batch)
                module.validation_step(batch, batch_idx)
        results = {name: sums[name] / counts[name] for name in sums if counts[name]}
        results.update({name: float(metric.compute()) for name, metric in metrics.items()})
    finally:
        for metric in _metrics(module):
            metric.reset()
        module.train(training)
        if guard is None:
            del module.log
        else:
            module.log = guard
    return {name.removeprefix("val/"): value for name, value in results.items()}


def _metrics(module: pl.LightningModule) -> list[Metric]:
    return [m for m in module.modules() if isinstance(m, Metric)]
