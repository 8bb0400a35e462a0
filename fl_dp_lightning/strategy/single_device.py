"""FederatedDPStrategy: the federated rounds on one device."""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from fl_dp_lightning.strategy.federated_dp import FederatedRounds


class SingleDeviceRounds(FederatedRounds):
    """The rounds on one device: the accelerator's first, unless ``device`` is given. Placed before a Lightning
    ``SingleDeviceStrategy`` of either namespace (``lightning.pytorch`` or ``pytorch_lightning``)."""

    @property
    def root_device(self) -> torch.device:
        # by class name: the accelerator may come from either Lightning namespace
        if "device" not in self._lightning_given and type(self.accelerator).__name__ == "CUDAAccelerator":
            return torch.device("cuda", torch.cuda.current_device())
        return self._root_device


class FederatedDPStrategy(SingleDeviceRounds, SingleDeviceStrategy):
    """Federated averaging over named clients, each training with DP-SGD (Opacus) on its own data.

    Use with :class:`~fl_dp_lightning.FederatedDataModule` (or any ``train_dataloader`` that returns
    :class:`~fl_dp_lightning.data.ClientDatasets`); the LightningModule needs no change. For projects written
    against the standalone ``pytorch_lightning`` package, use ``fl_dp_lightning.pytorch_lightning.FederatedDPStrategy``.

    Args:
        privacy: DP-SGD settings; ``PrivacyConfig(enabled=False)`` trains plain federated averaging.
        server: the server optimizer applied to the clients' average (``ServerConfig()``: plain FedAvg).
        engine: how clients compute their steps: ``"opacus"`` (any module, its ``training_step``, one client
            after another) or ``"vectorized"`` (the round's clients at once; see
            :class:`~fl_dp_lightning.config.EngineConfig`).
        user_privacy: user-level DP-FedAvg on the server (``UserPrivacyConfig(enabled=True, ...)``).
        secure_aggregation: masks so that the server decodes only each round's sum.
        local_epochs: passes each client makes over its own data per round.
        client_fraction: fraction of clients sampled to train in each round, in (0, 1] (under Poisson client
            sampling, each client's probability of taking part).
        client_sampling: ``uniform`` (a fixed number of clients per round) or ``poisson`` (each independently).
        proximal_mu: FedProx's mu: each client's objective adds ``mu / 2 * ||w - w_global||^2`` (0: FedAvg).
        client_overrides: per-client batch size, local epochs, noise multiplier and clip norm, by client name.
        on_client_failure: ``drop`` (a client that raises, or runs past ``client_time_limit``, leaves the round,
            which averages the others) or ``raise`` (the run fails).
        client_time_limit: seconds a client's round may take, or ``None``.
        syft: clients as PySyft datasites (``SyftConfig(...)``; needs ``engine="vectorized"``).
        seed: seed of the client sampling per round (and of batch sampling and noise only under
            ``privacy.unsafe_seeded_randomness``).
        log_rounds: add a :class:`~fl_dp_lightning.callbacks.FederatedLogger` when the Trainer has none.
        **lightning: ``SingleDeviceStrategy``'s own settings: ``device`` (by default the accelerator's first),
            ``accelerator`` and ``precision_plugin`` (set by the Trainer when left out), ``checkpoint_io`` (by
            default atomic writes verified on load).
    """

    strategy_name = "federated_dp"
