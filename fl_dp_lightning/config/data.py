"""Which data set a run reads: ``data=`` (Hydra group ``data``)."""

from __future__ import annotations

from dataclasses import dataclass

from fl_dp_lightning.config.choices import (
    DATA_FEATURES,
    DATA_SOURCES,
)
from fl_dp_lightning.config.errors import require


@dataclass
class DataConfig:
    """Which data set to train on and where it lives."""

    name: str = "mnist"
    """Data source: ``mnist``, ``fashion_mnist`` or ``synthetic``."""
    root: str = "data"
    """Directory for downloaded data sets (created on demand)."""
    eval_batch_size: int = 1024
    """Examples per validation/test batch (no privacy cost: evaluation sees only the shared public set)."""
    validation_fraction: float = 0.1
    """Share of the shared public set held out for validation (what EarlyStopping and ModelCheckpoint select
    on), in (0, 1); the rest is the test set, read only by ``trainer.test``."""
    synthetic_train_size: int = 2000
    """Training examples of the ``synthetic`` source."""
    synthetic_test_size: int = 500
    """Test examples of the ``synthetic`` source."""
    features: str = "pixels"
    """What the model reads: ``pixels`` (the images) or ``scatternet`` (ScatterNet features: a fixed scattering
    transform of each image alone, 81x7x7 per 28x28 image, computed once when the data loads; needs kymatio;
    ``model=scatternet`` sets it)."""

    def __post_init__(self) -> None:
        require(
            self.name in DATA_SOURCES,
            "data.name",
            self.name,
            f"unknown data set; choose one of {DATA_SOURCES}",
        )
        require(
            self.features in DATA_FEATURES,
            "data.features",
            self.features,
            f"unknown features; choose one of {DATA_FEATURES}",
        )
        require(
            0 < self.validation_fraction < 1,
            "data.validation_fraction",
            self.validation_fraction,
            "must be in (0, 1), e.g. 0.1",
        )
        require(self.eval_batch_size >= 1, "data.eval_batch_size", self.eval_batch_size, "must be >= 1")
        require(
            self.synthetic_train_size >= 1,
            "data.synthetic_train_size",
            self.synthetic_train_size,
            "must be >= 1",
        )
        require(
            self.synthetic_test_size >= 1,
            "data.synthetic_test_size",
            self.synthetic_test_size,
            "must be >= 1",
        )
