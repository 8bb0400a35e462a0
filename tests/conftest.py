"""Shared helpers: small Trainers, a logger that records what it is given, tiny data."""

from __future__ import annotations

import tempfile
from typing import Any

import dp_accounting
import lightning.pytorch as pl
import numpy as np
import pytest
from lightning.pytorch.loggers import Logger

from fl_dp_lightning.data.sources import DataSource, load_synthetic
from fl_dp_lightning.privacy.accountants import ORDERS, PLD_DISCRETIZATION


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call as (step, metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def series(self, key: str) -> dict[int, float]:
        """step -> value of every record that holds ``key``."""
        return {step: m[key] for step, m in self.records if key in m}


def make_trainer(strategy: Any, rounds: int, **kwargs: Any) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=rounds,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        default_root_dir=tempfile.mkdtemp(prefix="fl_dp_test_"),  # reports and logs stay out of the checkout
    )
    defaults.update(kwargs)
    return pl.Trainer(strategy=strategy, **defaults)


@pytest.fixture(scope="session")
def synthetic() -> DataSource:
    return load_synthetic(train_size=1200, test_size=400, seed=3)


def direct_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    """Replace-one epsilon of ``steps`` Poisson-subsampled Gaussian steps, straight from dp-accounting's PLD."""
    accountant = dp_accounting.pld.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
        value_discretization_interval=PLD_DISCRETIZATION,
    )
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


def direct_rdp_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    """The replace-one RDP bound (weak triangle inequality through one record removed), from dp-accounting's
    add/remove RDP of the subsampled Gaussian and its conversion."""
    from dp_accounting.rdp.rdp_privacy_accountant import _compute_rdp_poisson_subsampled_gaussian, compute_epsilon

    orders = np.array(ORDERS)

    def rdp(a: np.ndarray) -> np.ndarray:
        return steps * np.array([_compute_rdp_poisson_subsampled_gaussian(q, sigma, [o])[0] for o in a])

    bound = (orders - 0.5) / (orders - 1) * rdp(2 * orders) + rdp(2 * orders - 1)
    return compute_epsilon(orders, bound, delta)[0]
