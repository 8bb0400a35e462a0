"""How a run executes: the engine (``engine=``), the hardware (``hardware=``) and the Trainer (``trainer=``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_dp_lightning.config.choices import (
    ACCELERATORS,
    ENGINE_LOSSES,
    ENGINES,
    MEMORY_FORMATS,
    PER_EXAMPLE,
)
from fl_dp_lightning.config.errors import require


@dataclass
class EngineConfig:
    """How each client computes its DP-SGD steps (see :mod:`fl_dp_lightning.runtime.vectorized`)."""

    name: str = "opacus"
    """``opacus``: any LightningModule, its own ``training_step``, client after client (Opacus's hooks; the
    fastest on a few CPU cores). ``vectorized``: the round's clients at once with ``torch.func`` over the module's
    ``forward`` and ``loss`` (SGD, tensor data; the module's ``training_step`` is not called)."""
    loss: str = "cross_entropy"
    """``vectorized``: the per-example loss of ``forward``'s output and the target: ``cross_entropy``, ``nll``,
    ``mse`` or ``bce_with_logits`` (batch-mean or batch-sum as ``privacy.loss_reduction`` says)."""
    clients_per_chunk: int | None = None
    """``vectorized``: clients trained at once; ``null``: as many as fit 2 GiB on a CPU, half the free memory on
    a GPU."""
    compile: bool = False
    """``vectorized``: compile each client's step with ``torch.compile`` over batches padded to one static width
    (once per process: tens of seconds on a CPU; falls back to eager, with a warning, where it fails)."""
    per_example: str = "auto"
    """``vectorized``, under DP: how each example's gradient is computed. ``layers``: one pass of the batch through
    the module's layers and Opacus's per-layer rules (in ``engine.memory_format``); ``vmap``: ``torch.func`` over the
    examples (and the clients, on a GPU). ``auto``: ``layers`` on CPU cores when every trained layer has a rule and
    runs once per forward (about twice as fast there: benchmarks/speed.py), else ``vmap``. Both give the same
    gradients."""
    memory_format: str = "auto"
    """Layout of 4-D parameters and inputs while clients train: ``channels_last`` (convolutions and pooling run
    about twice as fast in it on CPU cores: benchmarks/speed.py), ``preserve`` (as the module and data have them),
    or ``auto``: ``channels_last`` on CPU cores, ``preserve`` on a GPU. Values are unchanged either way."""

    def channels_last_on(self, device: Any) -> bool:
        """Whether clients training on ``device`` (a ``torch.device``) use the channels-last layout."""
        return self.memory_format == "channels_last" or (self.memory_format == "auto" and device.type == "cpu")

    def __post_init__(self) -> None:
        require(self.name in ENGINES, "engine.name", self.name, f"choose one of {ENGINES}")
        require(
            self.memory_format in MEMORY_FORMATS,
            "engine.memory_format",
            self.memory_format,
            f"choose one of {MEMORY_FORMATS}",
        )
        require(self.per_example in PER_EXAMPLE, "engine.per_example", self.per_example, f"choose one of {PER_EXAMPLE}")
        require(self.loss in ENGINE_LOSSES, "engine.loss", self.loss, f"choose one of {ENGINE_LOSSES}")
        require(
            self.clients_per_chunk is None or self.clients_per_chunk >= 1,
            "engine.clients_per_chunk",
            self.clients_per_chunk,
            "must be >= 1 (or null: sized to memory)",
        )


@dataclass
class HardwareConfig:
    """Where training runs."""

    accelerator: str = "cpu"
    """``cpu`` or ``gpu`` (CUDA)."""
    devices: int = 1
    """Processes per node (one device each); more than one process splits the clients among them."""
    num_nodes: int = 1
    """Nodes (machines); launched by torchrun or SLURM, which Lightning detects."""

    def __post_init__(self) -> None:
        require(self.num_nodes >= 1, "hardware.num_nodes", self.num_nodes, "must be >= 1")
        require(
            self.accelerator in ACCELERATORS,
            "hardware.accelerator",
            self.accelerator,
            f"choose {ACCELERATORS}",
        )
        require(self.devices >= 1, "hardware.devices", self.devices, "must be >= 1")


@dataclass
class TrainerConfig:
    """The federated schedule and the Lightning Trainer's settings."""

    rounds: int = 5
    """Federated rounds (one Lightning epoch each)."""
    local_epochs: int = 1
    """Passes over its own data that each client makes per round (expected, under Poisson sampling)."""
    batch_size: int = 128
    """Expected examples per client batch (sample rate = batch_size / client data size)."""
    seed: int = 0
    """Seed of model init, partition, sampling and noise."""
    progress_bar: bool = True
    """Show Lightning's progress bar."""
    log_every_n_steps: int = 10
    """How often (in optimizer steps) Lightning logs step metrics."""
    ckpt_path: str | None = None
    """Checkpoint to resume from (``null`` starts fresh)."""

    def __post_init__(self) -> None:
        require(self.rounds >= 1, "trainer.rounds", self.rounds, "must be >= 1")
        require(self.local_epochs >= 1, "trainer.local_epochs", self.local_epochs, "must be >= 1")
        require(self.batch_size >= 1, "trainer.batch_size", self.batch_size, "must be >= 1")
        require(self.log_every_n_steps >= 1, "trainer.log_every_n_steps", self.log_every_n_steps, "must be >= 1")
        require(0 <= self.seed < 2**32, "trainer.seed", self.seed, "must be in [0, 2**32)")
        if self.ckpt_path is not None:
            path = Path(self.ckpt_path)
            require(path.exists(), "trainer.ckpt_path", self.ckpt_path, "no such file; give the path of a .ckpt file")
            require(path.is_file(), "trainer.ckpt_path", self.ckpt_path, "is a folder; give the .ckpt file inside it")
