"""What the vectorized engine cannot train, refused in one line with the fix before any privacy is spent."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import SGD, Optimizer
from torch.utils.data import Dataset, TensorDataset

from fl_dp_lightning.config import ConfigError


def check_vectorizable(
    module: nn.Module, optimizer: Optimizer, step_schedulers: int, datasets: Mapping[str, Dataset], precision: str
) -> None:
    """Refuses, in one line with the fix, what the vectorized engine cannot train (before any privacy is spent)."""
    problems = []
    for name, dataset in datasets.items():
        if not (isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2):
            problems.append(
                f"client {name!r} holds a {type(dataset).__name__}: it needs each client's data as "
                "TensorDataset(inputs, targets)"
            )
            break
    norms = sorted({type(m).__name__ for m in module.modules() if isinstance(m, _BatchNorm)})
    if norms:
        problems.append(
            f"{', '.join(norms)} updates running statistics from each batch, which a functional step cannot carry; "
            "set privacy.fix_modules=true (it becomes GroupNorm)"
        )
    if type(optimizer) is not SGD:
        problems.append(
            f"it runs SGD (lr, momentum, weight decay, nesterov); configure_optimizers returned "
            f"{type(optimizer).__name__}"
        )
    if step_schedulers:
        problems.append("an LR scheduler with interval='step' would step once per round; use interval='epoch'")
    if precision not in ("32", "32-true"):
        problems.append(f"precision={precision!r}: it trains in float32; use precision=32")
    if problems:
        raise ConfigError("engine=vectorized cannot train this run: " + "; ".join(problems) + " (or use engine=opacus)")
