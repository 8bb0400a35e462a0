"""What the server may read of a run and release: epsilons, the clients' public records, held-out metrics and
class counts where the privacy rules allow them (a mixin of
:class:`~fl_dp_lightning.strategy.federated_dp.FederatedRounds`: the one place that decides what leaves)."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.utils.data import TensorDataset

from fl_dp_lightning.runtime.client import ClientState
from fl_dp_lightning.runtime.evaluation import evaluate_on
from fl_dp_lightning.update import ClientRecord


class ReleaseRules:
    """The release decisions of :class:`~fl_dp_lightning.strategy.federated_dp.FederatedRounds`."""

    def evaluate_clients(self) -> dict[str, dict[str, float]]:
        """The global model's metrics on each client's held-out records (``client.holdout_fraction``), from the
        module's ``validation_step``; computed only where they may be released (no DP, or
        ``privacy.unsafe_release_training_metrics``): they come from private records without noise."""
        if not self.holdouts or not self.releases_client_outputs:
            return {}
        batch = self._holdout_batch_size
        return {
            name: evaluate_on(self.lightning_module, dataset, batch_size=batch, to_device=self.batch_to_device)
            for name, dataset in self.holdouts.items()
        }

    @property
    def current_client(self) -> str | None:
        """The client whose batches are training now (``None`` between rounds, and where participation is
        withheld)."""
        client = None if self._loop is None else self._loop.client
        return None if client is None or self.participation_withheld else client.name

    @property
    def guaranteed(self) -> bool:
        """Whether the epsilons reported are proven upper bounds for what this run does."""
        return self.privacy.enabled and not self.privacy.weakened_by()

    @property
    def releases_client_outputs(self) -> bool:
        """Whether values computed from client records without noise (training metrics, training-stage
        ``self.log``, held-out metrics, error messages) may leave a client: only with no DP at all (record- or
        user-level), or under ``privacy.unsafe_release_training_metrics``."""
        if self.privacy.unsafe_release_training_metrics:
            return True
        return not self.privacy.enabled and not self.user_privacy.enabled

    @property
    def participation_withheld(self) -> bool:
        """Whether who took part in each round is kept from loggers and reports: under user-level DP with sampled
        clients (unless ``user_privacy.release_participation``), where the user-level epsilon relies on it."""
        return self.user_level is not None and self.user_level.participation_secret

    def epsilon_of(self, client: ClientState) -> float | None:
        """A client's released epsilon at ``privacy.delta``: its accountant's, or, where participation is withheld,
        the bound for a client that took part in every round so far (its own would show its rounds); ``None``
        without privacy or where none is proven (shuffled batches). GDP's value is an approximation."""
        if not self.privacy.enabled or not self.privacy.poisson_sampling:
            return None
        if self.participation_withheld:
            return client.epsilon_if_every_round(self.rounds_run, self.privacy.delta)
        return client.epsilon(self.privacy.delta)

    def epsilons(self) -> dict[str, float | None]:
        """Every client's privacy spent so far at ``privacy.delta`` (see :meth:`epsilon_of`)."""
        return {name: self.epsilon_of(c) for name, c in self.clients.items()}

    def released_labels(self) -> dict[str, Tensor | None] | None:
        """Each client's integer labels (``None`` where its data is not a ``TensorDataset`` of 1-d labels), only
        where they may be released (no DP at all, or ``privacy.unsafe_release_class_counts``); else ``None``."""
        no_dp = not self.privacy.enabled and self.user_level is None
        if not (no_dp or self.privacy.unsafe_release_class_counts):
            return None
        return {name: _labels(c.dataset) for name, c in self.clients.items()}

    def records(self) -> dict[str, ClientRecord]:
        """The server's public view of every client (what reports and loggers read)."""
        return {name: c.record(self.epsilon_of(c)) for name, c in self.clients.items()}


def _labels(dataset: Any) -> Tensor | None:
    if isinstance(dataset, TensorDataset) and dataset.tensors[-1].dim() == 1:
        return dataset.tensors[-1]
    return None
