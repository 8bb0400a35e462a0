"""The contract every client runtime keeps: a round's request in, one :class:`~fl_dp_lightning.update.ClientUpdate`
per client out, and nothing else across the boundary."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from torch import Tensor
from torch.optim import Optimizer

from fl_dp_lightning.runtime.client import ClientState
from fl_dp_lightning.update import ClientUpdate, RoundRequest


class ClientRuntime(Protocol):
    """A runtime that trains a round's clients in one call: the vectorized engine, PySyft datasites."""

    def train(self, request: RoundRequest, clients: Sequence[ClientState]) -> Iterator[ClientUpdate]:
        """Each client's round from the module's current (global) weights, in ``clients``' order."""
        ...


class LoopRuntime(Protocol):
    """A runtime inside Lightning's batch loop (the Opacus engine): the strategy serves the client's batches
    between ``begin`` and ``end``."""

    def begin(
        self, client: ClientState, optimizer: Optimizer, schedulers: Sequence[Any], after_noise: Callable[[], None]
    ) -> None:
        """Starts ``client``'s round."""
        ...

    def end(self, round_no: int, state: Mapping[str, Tensor]) -> ClientUpdate:
        """Ends the current client's round with its one update."""
        ...
