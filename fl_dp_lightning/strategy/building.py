"""The parts of a run built once its clients are known: the module made trainable under DP, the client runtime,
user-level DP, the probe's batches and the noise calibrated to a target (a mixin of
:class:`~fl_dp_lightning.strategy.federated_dp.FederatedRounds`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import TensorDataset

from fl_dp_lightning.config import ConfigError
from fl_dp_lightning.data.datamodule import ClientDatasets, FederatedDataModule, RecordCount
from fl_dp_lightning.privacy.calibration import calibrate_noise_multiplier
from fl_dp_lightning.privacy.layers import describe_changes, fix_layers
from fl_dp_lightning.privacy.probe import probe_sizes, random_batch_like
from fl_dp_lightning.runtime.sampling import same_format, take_batch
from fl_dp_lightning.runtime.syft.clients import SyftClients
from fl_dp_lightning.runtime.vectorized.checks import check_vectorizable
from fl_dp_lightning.runtime.vectorized.engine import VectorizedClients
from fl_dp_lightning.server.user_level import UserLevelDP
from fl_dp_lightning.strategy.checks import check_syft, check_user_delta


class RunParts:
    """Builds what :class:`~fl_dp_lightning.strategy.federated_dp.FederatedRounds` trains with, before any step."""

    def _fix_modules(self) -> None:
        """Replaces the layers DP-SGD cannot train, in place (see :mod:`fl_dp_lightning.privacy.layers`)."""
        changes = fix_layers(self.lightning_module, self.privacy.fix_norm)
        if any(change.startswith("replaced") for change in changes):
            warnings.warn(
                "privacy.fix_modules changed the model: "
                + describe_changes(changes)
                + ". Compare its accuracy without DP "
                "(privacy=none) and try privacy.fix_norm=auto|groupnorm|layernorm|identity",
                stacklevel=2,
            )
        for change in changes:
            rank_zero_info(f"privacy.fix_modules: {change}")

    def _withhold_logs(self) -> None:
        """Keeps the module's training-stage ``self.log`` calls in: they are computed from a client's records."""
        module = self.lightning_module
        release = module.log

        def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            if module.trainer.training:
                self.withheld_logs.add(name)  # computed from a client's records without noise
                return
            release(name, value, *args, **kwargs)

        module.log = log  # log_dict goes through it too

    def _check_vectorizable(self, data: ClientDatasets) -> None:
        trainer = self.lightning_module.trainer
        step_schedules = sum(1 for c in trainer.lr_scheduler_configs if c.interval == "step")
        check_vectorizable(
            self.lightning_module, self.optimizers[0], step_schedules, data.datasets, str(trainer.precision)
        )

    def _make_vectorized(self, data: ClientDatasets) -> VectorizedClients:
        self._check_vectorizable(data)
        return VectorizedClients(
            self.lightning_module,
            self.optimizers[0],
            data.datasets,
            list(self.clients.values()),
            engine=self.engine,
            privacy=self.privacy,
            device=self.root_device,
            public=data.public if isinstance(data.public, TensorDataset) else None,
        )

    def _make_syft(self, data: ClientDatasets) -> SyftClients:
        self._check_vectorizable(data)
        check_syft(vectorized=True, secure_aggregation=self.secure_aggregation, holdouts=bool(self.holdouts))
        clients = SyftClients(
            self.lightning_module,
            self.optimizers[0],
            data.datasets,
            list(self.clients.values()),
            engine=self.engine,
            privacy=self.privacy,
            config=self.syft,
            batch_size=data.batch_size,
            local_epochs=self.local_epochs,
            overrides=self.client_overrides,
            seed=self.seed,
            release_outputs=self.releases_client_outputs,
        )
        if self.syft.port is None:
            warnings.warn(
                "client.runtime=syft with client.syft.port=null runs every datasite inside this process: a "
                "simulation with no isolation (this process can read every record and any datasite's state); set "
                "client.syft.port for datasites in their own processes",
                stacklevel=2,
            )
        else:  # the records now live in the datasites' processes: this one keeps their counts only
            for client in self.clients.values():
                client.dataset = RecordCount(client.num_examples)
            data.hand_over_records()
            datamodule = self.lightning_module.trainer.datamodule
            if isinstance(datamodule, FederatedDataModule):
                datamodule.hand_over_records()
        return clients

    def _make_user_level(self) -> UserLevelDP:
        check_user_delta(self.user_privacy, len(self.clients))
        sampled = self.client_sampling in ("poisson", "epoch")
        user_level = UserLevelDP(
            self.user_privacy,
            sample_rate=self.client_fraction if sampled else 1.0,
            num_clients=len(self.clients),
            seeded=self.privacy.unsafe_seeded_randomness,
            seed=self.seed,
            device=self.root_device,
        )
        if self.user_privacy.target_epsilon is not None and self._restored is None:
            rounds = self._finite_rounds("user_privacy.target_epsilon")
            sigma = user_level.calibrate(rounds)
            rank_zero_info(
                f"user_privacy.target_epsilon={self.user_privacy.target_epsilon} over {rounds} rounds: server noise "
                f"multiplier {sigma:.4f} (replaces user_privacy.noise_multiplier={self.user_privacy.noise_multiplier})"
            )
        return user_level

    def _finite_rounds(self, key: str) -> int:
        rounds = self.lightning_module.trainer.max_epochs
        if rounds is None or rounds < 1:
            raise ConfigError(f"{key} needs a finite number of rounds: set Trainer(max_epochs=...)")
        return rounds

    def _probe_sensitivity(self, data: ClientDatasets) -> None:
        """Refuses, before any step, modules whose per-example gradients would not bound a record's influence."""
        module = self.lightning_module
        guard = module.__dict__.get("log")
        module.log = _no_log  # the probe's records are nobody's metrics
        try:
            sizes = probe_sizes([c.batch_size for c in self.clients.values()])
            self._loop.probe(module, self._probe_batches(data), sizes)
        finally:
            if guard is None:
                del module.log
            else:
                module.log = guard

    def _probe_batches(self, data: ClientDatasets) -> Callable[[int], Any]:
        """The probe's batches of a given size: records of the public set where it has the clients' format (their
        scale and classes), else random records shaped like a client's (no client record is read)."""
        template = take_batch(next(iter(data.datasets.values())), [])  # structure only: zero records
        public = data.public if data.public is not None and same_format(data.public, template) else None
        generator = torch.Generator().manual_seed(0)

        def batch(size: int) -> Any:
            if public is not None:
                drawn = take_batch(public, torch.randint(len(public), (size,), generator=generator).tolist())
            else:
                drawn = random_batch_like(template, size, generator, data.num_classes)
            return self.batch_to_device(drawn)

        return batch

    def _calibrate_noise(self) -> None:
        """Sets each client's noise multiplier so that all planned rounds spend ``privacy.target_epsilon``."""
        rounds = self.planned_rounds = self._finite_rounds("privacy.target_epsilon")
        chosen = {}
        for client in self.clients.values():
            client.noise_multiplier = calibrate_noise_multiplier(
                target_epsilon=self.privacy.target_epsilon,
                delta=self.privacy.delta,
                sample_rate=client.sample_rate,
                steps=rounds * client.steps_per_round,
                accountant=self.privacy.accountant,
                conversion=self.privacy.rdp_conversion,
            )
            chosen[client.name] = round(client.noise_multiplier, 4)
        rank_zero_info(
            f"privacy.target_epsilon={self.privacy.target_epsilon} over {rounds} rounds: calibrated noise multipliers "
            f"{chosen} (these replace privacy.noise_multiplier={self.privacy.noise_multiplier})"
        )


def _no_log(*args: Any, **kwargs: Any) -> None:
    pass
