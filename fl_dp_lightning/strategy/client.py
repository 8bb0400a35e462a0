"""A client's lasting state and the update it hands to the server after a round.

A client keeps only what must outlive a round: its accountant and its random streams. Weights and the
optimizer are rebuilt from the global model every round, so a thousand clients cost a thousand small
records, not a thousand models.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from opacus.accountants import IAccountant
from torch.utils.data import Dataset

from fl_dp_lightning.config import PrivacyConfig
from fl_dp_lightning.privacy.accountants import epsilon_spent, make_accountant
from fl_dp_lightning.strategy.sampling import (
    NOISE_STREAM,
    SAMPLER_STREAM,
    client_seed,
    poisson_batches,
    poisson_steps_per_epoch,
    shuffled_batches,
)


@dataclass
class ClientReport:
    """What one client's round reports besides its weights (which go straight into the running FedAvg).

    Attributes:
        client: the client's name.
        num_examples: its training-set size (the FedAvg weight).
        epsilon: its total privacy spent so far (``None`` without privacy).
        metrics: means over its steps of the scalars its ``training_step`` returned (e.g. loss).
    """

    client: str
    num_examples: int
    epsilon: float | None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ClientState:
    """One client's data, sampling settings and lasting privacy state."""

    name: str
    dataset: Dataset
    batch_size: int
    sample_rate: float
    steps_per_round: int
    local_epochs: int
    poisson: bool
    noise_multiplier: float
    accountant: IAccountant | None
    sampler_rng: torch.Generator
    noise_rng: torch.Generator | None

    @property
    def num_examples(self) -> int:
        return len(self.dataset)

    def batch_indices(self) -> Iterator[list[int]]:
        """The record indices of each of this round's batches (advances the sampler stream)."""
        if self.poisson:
            return poisson_batches(self.num_examples, self.sample_rate, self.steps_per_round, self.sampler_rng)
        return shuffled_batches(self.num_examples, self.batch_size, self.local_epochs, self.sampler_rng)

    def epsilon(self, delta: float) -> float | None:
        """Privacy spent so far at ``delta`` (``None`` when privacy is off)."""
        return None if self.accountant is None else epsilon_spent(self.accountant, delta)

    def epsilon_after(self, steps: int, delta: float) -> float:
        """The epsilon this client would reach after ``steps`` more steps at its noise and sample rate."""
        trial = type(self.accountant)()
        trial.history = [*self.accountant.history, (self.noise_multiplier, self.sample_rate, steps)]
        return epsilon_spent(trial, delta)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must carry to continue this client exactly."""
        return {
            "accountant": None if self.accountant is None else self.accountant.state_dict(),
            "sampler_rng": self.sampler_rng.get_state(),
            "noise_rng": None if self.noise_rng is None else self.noise_rng.get_state(),
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["sample_rate"] != self.sample_rate:
            raise ValueError(
                f"client {self.name!r}: checkpoint sample rate {state['sample_rate']} differs from "
                f"{self.sample_rate} (batch size or data changed); resume with the original settings"
            )
        if self.accountant is not None:
            self.accountant.load_state_dict(state["accountant"])
        self.sampler_rng.set_state(state["sampler_rng"])
        if self.noise_rng is not None:
            self.noise_rng.set_state(state["noise_rng"])
        self.noise_multiplier = state["noise_multiplier"]


def make_client(
    name: str,
    index: int,
    dataset: Dataset,
    *,
    batch_size: int,
    privacy: PrivacyConfig,
    local_epochs: int,
    seed: int,
    device: torch.device,
) -> ClientState:
    """Builds client ``index``'s state; its random streams derive from ``seed`` and ``index`` alone."""
    n = len(dataset)
    if batch_size > n:
        raise ValueError(
            f"client {name!r} holds {n} examples, fewer than the batch size {batch_size}: "
            "lower trainer.batch_size, use fewer clients, or give this client more data"
        )
    if privacy.enabled and privacy.delta >= 1 / n:
        raise ValueError(
            f"privacy.delta={privacy.delta:g} is not below 1/n = 1/{n} for client {name!r}: a delta that large "
            f"permits releasing a record outright; set privacy.delta well below {1 / n:.2g} (e.g. 1e-5)"
        )
    sample_rate = batch_size / n
    poisson = privacy.enabled and privacy.poisson_sampling
    steps_per_epoch = poisson_steps_per_epoch(sample_rate) if poisson else n // batch_size
    noise_rng = None
    if privacy.enabled:
        # secure mode: noise seeds come from the OS's entropy, not from the (public) run seed
        noise_seed = secrets.randbits(63) if privacy.secure_mode else client_seed(seed, index, NOISE_STREAM)
        noise_rng = torch.Generator(device=device).manual_seed(noise_seed)
    return ClientState(
        name=name,
        dataset=dataset,
        batch_size=batch_size,
        sample_rate=sample_rate,
        steps_per_round=steps_per_epoch * local_epochs,
        local_epochs=local_epochs,
        poisson=poisson,
        noise_multiplier=privacy.noise_multiplier,
        accountant=make_accountant(privacy.accountant, privacy.rdp_conversion) if privacy.enabled else None,
        sampler_rng=torch.Generator().manual_seed(client_seed(seed, index, SAMPLER_STREAM)),
        noise_rng=noise_rng,
    )
