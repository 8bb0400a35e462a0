"""The server's side of a round: its optimizer (``server=``) and secure aggregation (``secure_aggregation=``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fl_dp_lightning.config.choices import (
    SERVER_OPTIMIZERS,
)
from fl_dp_lightning.config.errors import require


@dataclass
class ServerConfig:
    """How the server turns the clients' average into the next global model (see :mod:`fl_dp_lightning.server`)."""

    optimizer: str = "fedavg"
    """``fedavg``, ``fedavgm`` (server momentum), ``fedadagrad``, ``fedadam`` or ``fedyogi`` (Reddi et al. 2021)."""
    lr: float = 1.0
    """Server learning rate: the step along the average client delta (1 with ``fedavg`` is plain FedAvg)."""
    momentum: float = 0.9
    """``fedavgm``'s momentum, in [0, 1)."""
    beta1: float = 0.9
    """First-moment decay of the adaptive optimizers, in [0, 1)."""
    beta2: float = 0.99
    """Second-moment decay of ``fedadam`` and ``fedyogi``, in [0, 1)."""
    tau: float = 1e-3
    """Adaptivity floor of the adaptive optimizers (added to the root of the second moment), > 0."""

    def __post_init__(self) -> None:
        require(
            self.optimizer in SERVER_OPTIMIZERS,
            "server.optimizer",
            self.optimizer,
            f"choose one of {SERVER_OPTIMIZERS}",
        )
        require(0 < self.lr < math.inf, "server.lr", self.lr, "must be > 0 and finite")
        for key in ("momentum", "beta1", "beta2"):
            require(0 <= getattr(self, key) < 1, f"server.{key}", getattr(self, key), "must be in [0, 1)")
        require(0 < self.tau < math.inf, "server.tau", self.tau, "must be > 0 and finite")


@dataclass
class SecureAggregationConfig:
    """Secure aggregation, simulated (see :mod:`fl_dp_lightning.server.secure_sum`): the server sees only the sum."""

    enabled: bool = False
    """Mask each client's contribution so that only the round's sum can be decoded."""
    bits: int = 48
    """The modulus 2^bits of the fixed-point integers, in [16, 62]."""
    scale: float = 1048576.0
    """Fixed-point scale: values are rounded to multiples of 1 / scale (2^20 by default); the sum over the round's
    clients must stay below 2^(bits - 1) / scale, which is checked."""
    threshold: float = 2 / 3
    """Shares needed to recover a client's secrets, as a fraction of its neighbourhood (it and its neighbours),
    rounded up, in (0.5, 1]; a round in which fewer of a neighbourhood survive is refused. Above one half, a server
    that tells some survivors a client dropped and others that it survived cannot collect both of its secrets."""
    neighbors: int | None = None
    """Neighbours each client masks with (SecAgg+); ``null``: all the round's other clients."""

    def __post_init__(self) -> None:
        require(16 <= self.bits <= 62, "secure_aggregation.bits", self.bits, "must be in [16, 62]")
        require(0 < self.scale < math.inf, "secure_aggregation.scale", self.scale, "must be > 0 and finite")
        require(
            0.5 < self.threshold <= 1,
            "secure_aggregation.threshold",
            self.threshold,
            "must be in (0.5, 1]: with half of a neighbourhood or fewer, a server that tells some survivors a client "
            "dropped and others that it survived collects both of its secrets and reads its update (e.g. 2/3)",
        )
        require(
            self.neighbors is None or self.neighbors >= 2,
            "secure_aggregation.neighbors",
            self.neighbors,
            "must be >= 2 (or null: all)",
        )
