"""What crosses the trust boundary between a client and the server, and the server's public view of a client.

A client runtime (Opacus inside Lightning's loop, the vectorized engine, a PySyft datasite) hands the server one
:class:`ClientUpdate` per client and round, and nothing else. Loggers, reports and checkpoints read these and
:class:`ClientRecord`, never a client's state (which holds its records and secret random streams).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@dataclass(frozen=True)
class ClientUpdate:
    """One client's round as the server receives it.

    Attributes:
        client: the client's name.
        round: the round it trained in (1-based).
        params: its trained parameters (noised under DP); ``None`` when its round failed, and in the round's
            reports once the parameters are in the average.
        num_examples: its record count, the FedAvg weight (public: the round plan is built from it).
        steps: the DP steps it took this round (the privacy it spent, at its public noise and sample rate).
        metrics: its training metrics, only where the privacy rules release them (else empty).
        failure: why its round failed, already filtered for release (``None`` when it trained).
    """

    client: str
    round: int
    params: Mapping[str, Tensor] | None
    num_examples: int
    steps: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    failure: str | None = None

    def averaged(self) -> ClientUpdate:
        """This update as the round's report keeps it: without its parameters (they are in the average)."""
        return replace(self, params=None)

    @property
    def dropped(self) -> bool:
        """Whether the client failed in this round (its update is left out of the average)."""
        return self.failure is not None


@dataclass(frozen=True)
class ClientRecord:
    """The server's public view of a client: its settings and the privacy it has spent, nothing of its records.

    Attributes:
        name: the client's name.
        num_examples: its record count.
        batch_size: its expected batch size (records).
        local_epochs: its passes over its data per round.
        sample_rate: its per-step sampling probability (``batch_size / num_examples``).
        noise_multiplier: its DP-SGD noise multiplier (after calibration).
        max_grad_norm: its per-example clip norm.
        history: its accountant's history, ``(noise_multiplier, sample_rate, steps)`` entries (empty without DP).
        steps_taken: its optimizer steps over all rounds.
        epsilon: its released epsilon at ``privacy.delta`` (``None`` without DP or where none is proven).
    """

    name: str
    num_examples: int
    batch_size: int
    local_epochs: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    history: tuple[tuple[float, float, int], ...]
    steps_taken: int
    epsilon: float | None


@dataclass(frozen=True)
class RoundRequest:
    """What the server sends a round's clients besides the global weights.

    Attributes:
        round: the round (1-based).
        proximal_mu: FedProx's mu (0: FedAvg).
        release_metrics: whether the privacy rules let training metrics leave a client.
    """

    round: int
    proximal_mu: float = 0.0
    release_metrics: bool = False


@runtime_checkable
class FederatedRun(Protocol):
    """What loggers, callbacks and the privacy report read of a federated run (the strategy implements it): the
    round's released updates, every client's public record, and the run's privacy settings and releases."""

    privacy: Any
    user_privacy: Any
    user_level: Any
    secure_aggregation: Any
    syft: Any
    last_round: list[ClientUpdate]
    faults: list[dict[str, Any]]
    withheld_logs: set[str]
    guaranteed: bool
    participation_withheld: bool
    current_client: str | None

    def records(self) -> dict[str, ClientRecord]: ...

    def epsilons(self) -> dict[str, float | None]: ...

    def evaluate_clients(self) -> dict[str, dict[str, float]]: ...

    def released_labels(self) -> dict[str, Any] | None: ...
