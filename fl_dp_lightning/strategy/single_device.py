"""FederatedDPStrategy: the federated rounds on one device, with every setting in its signature."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from lightning.fabric.utilities.types import _DEVICE
from lightning.pytorch.strategies import SingleDeviceStrategy

from fl_dp_lightning.config import (
    ClientOverride,
    ConfigError,
    EngineConfig,
    PrivacyConfig,
    SecureAggregationConfig,
    ServerConfig,
    SyftConfig,
    UserPrivacyConfig,
)
from fl_dp_lightning.strategy.federated_dp import FederatedRounds


class SingleDeviceRounds(FederatedRounds):
    """The rounds on one device: the accelerator's first, unless ``device`` is given. Placed before a Lightning
    ``SingleDeviceStrategy`` of either namespace (``lightning.pytorch`` or ``pytorch_lightning``)."""

    def __init__(
        self,
        *,
        privacy: PrivacyConfig | None = None,
        server: ServerConfig | None = None,
        engine: str | EngineConfig = "opacus",
        user_privacy: UserPrivacyConfig | None = None,
        secure_aggregation: SecureAggregationConfig | None = None,
        local_epochs: int = 1,
        client_fraction: float = 1.0,
        client_sampling: str = "uniform",
        proximal_mu: float = 0.0,
        client_overrides: Mapping[str, ClientOverride] | None = None,
        on_client_failure: str = "drop",
        client_time_limit: float | None = None,
        syft: SyftConfig | None = None,
        seed: int = 0,
        log_rounds: bool = True,
        device: _DEVICE | None = None,
        accelerator: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
        **unknown: Any,
    ):
        if unknown:
            raise ConfigError(unknown_setting(type(self), next(iter(unknown))))
        settings = {k: v for k, v in locals().items() if k in _SETTINGS}
        if checkpoint_io is None:
            settings.pop("checkpoint_io")  # the rounds' verified checkpoint IO is the default
        super().__init__(**{**settings, "device": device if device is not None else "cpu"})
        self._device_given = device is not None

    @property
    def root_device(self) -> torch.device:
        # by class name: the accelerator may come from either Lightning namespace
        if not self._device_given and type(self.accelerator).__name__ == "CUDAAccelerator":
            return torch.device("cuda", torch.cuda.current_device())
        return self._root_device


_SETTINGS = [
    name for name in inspect.signature(SingleDeviceRounds.__init__).parameters if name not in ("self", "unknown")
]


def unknown_setting(strategy: type, name: str) -> str:
    """One line for a keyword ``strategy`` does not take, naming the closest setting."""
    close = difflib.get_close_matches(name, _SETTINGS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{strategy.__name__} got an unknown setting {name!r}: {hint}its settings are {', '.join(_SETTINGS)}"


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
        device: the device to train on; by default the accelerator's first device.
        accelerator: Lightning's (set by the Trainer when left out).
        checkpoint_io: Lightning's checkpoint IO; by default atomic writes verified on load.
        precision_plugin: Lightning's (set by the Trainer when left out).
    """

    strategy_name = "federated_dp"
