"""A client's lasting state: its records, sampling settings, secret random streams and accountant.

A client keeps only what must outlive a round: its accountant and its random streams. Weights and the
optimizer are rebuilt from the global model every round, so a thousand clients cost a thousand small
records, not a thousand models. Its random streams are secret (see :mod:`fl_dp_lightning.privacy.randomness`):
a checkpoint carries their state only under ``privacy.unsafe_seeded_randomness``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from opacus.accountants import IAccountant
from torch.utils.data import Dataset

from fl_dp_lightning.audit.dirac import DiracCanaries
from fl_dp_lightning.config import ClientOverride, ConfigError, PrivacyConfig
from fl_dp_lightning.privacy.accountants import epsilon_of_history, epsilon_spent, make_accountant
from fl_dp_lightning.privacy.randomness import NOISE_STREAM, SAMPLER_STREAM, stream_generator
from fl_dp_lightning.runtime.sampling import poisson_batches, poisson_steps_per_epoch, shuffled_batches
from fl_dp_lightning.update import ClientRecord


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
    max_grad_norm: float
    accountant: IAccountant | None
    sampler_rng: torch.Generator
    noise_rng: torch.Generator | None
    seeded: bool = False
    """Whether the random streams come from the public run seed (then checkpoints carry their state)."""
    steps_taken: int = 0
    """Optimizer steps this client has made over all rounds (with or without privacy)."""
    canaries: DiracCanaries | None = None
    """An audit's Dirac canaries, which every step samples among this client's records (audit runs only)."""

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
        """The epsilon this client would reach after ``steps`` more steps at its noise and sample rate.

        Accountants that read their whole history (``pld``, ``rdp``) only; GDP is refused with a budget.
        """
        history = [*self.accountant.history, (self.noise_multiplier, self.sample_rate, steps)]
        return epsilon_of_history(type(self.accountant), history, delta)

    def epsilon_if_every_round(self, rounds: int, delta: float) -> float:
        """The epsilon this client would have spent had it trained in each of ``rounds`` rounds: a bound computed
        from public settings alone, released where its own epsilon would show which rounds it took part in."""
        steps = rounds * self.steps_per_round
        history = [(self.noise_multiplier, self.sample_rate, steps)] if steps else []
        return epsilon_of_history(type(self.accountant), history, delta)

    def record(self, epsilon: float | None) -> ClientRecord:
        """The server's public view of this client, with its released ``epsilon``."""
        history = () if self.accountant is None else tuple(tuple(entry) for entry in self.accountant.history)
        return ClientRecord(
            name=self.name,
            num_examples=self.num_examples,
            batch_size=self.batch_size,
            local_epochs=self.local_epochs,
            sample_rate=self.sample_rate,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            history=history,
            steps_taken=self.steps_taken,
            epsilon=epsilon,
        )

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must carry to continue this client exactly."""
        state = {
            "accountant": None if self.accountant is None else self.accountant.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps_taken": self.steps_taken,
        }
        if self.seeded:  # secret streams never leave the process; a resume draws fresh ones
            state["sampler_rng"] = self.sampler_rng.get_state()
            state["noise_rng"] = None if self.noise_rng is None else self.noise_rng.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["sample_rate"] != self.sample_rate:
            raise ConfigError(
                f"client {self.name!r}: checkpoint sample rate {state['sample_rate']} differs from "
                f"{self.sample_rate} (batch size or data changed); resume with the original settings"
            )
        if self.accountant is not None:
            self.accountant.load_state_dict(state["accountant"])
        if self.seeded:
            self.sampler_rng.set_state(state["sampler_rng"])
            if self.noise_rng is not None:
                self.noise_rng.set_state(state["noise_rng"])
        self.noise_multiplier = state["noise_multiplier"]
        self.steps_taken = state["steps_taken"]


def make_client(
    name: str,
    index: int,
    dataset: Dataset,
    *,
    privacy: PrivacyConfig,
    batch_size: int,
    local_epochs: int,
    override: ClientOverride | None = None,
    seed: int,
    device: torch.device,
) -> ClientState:
    """Builds client ``index``'s state; its random streams are secret, or derive from ``seed`` and ``index``
    alone under ``privacy.unsafe_seeded_randomness`` (and without privacy, where nothing is protected).

    ``override`` replaces the run's batch size, local epochs, noise multiplier and clip norm for this client.
    """
    override = override or ClientOverride()
    batch_size = override.batch_size or batch_size
    local_epochs = override.local_epochs or local_epochs
    n = len(dataset)
    if batch_size > n:
        raise ConfigError(
            f"client {name!r} holds {n} examples, fewer than the batch size {batch_size}: "
            "lower trainer.batch_size, use fewer clients, give this client more data, or leave such clients out "
            "with client.drop_small=true"
        )
    if privacy.enabled and privacy.delta >= 1 / n:
        raise ConfigError(
            f"privacy.delta={privacy.delta:g} is not below 1/n = 1/{n} for client {name!r}: a delta that large "
            f"permits releasing a record outright; set privacy.delta well below {1 / n:.2g} (e.g. 1e-5)"
        )
    sample_rate = batch_size / n
    poisson = privacy.enabled and privacy.poisson_sampling
    steps_per_epoch = poisson_steps_per_epoch(sample_rate) if poisson else n // batch_size
    seeded = not privacy.enabled or privacy.unsafe_seeded_randomness
    noise_rng = (
        stream_generator(seeded=seeded, seed=seed, index=index, stream=NOISE_STREAM, device=device)
        if privacy.enabled
        else None
    )
    return ClientState(
        name=name,
        dataset=dataset,
        batch_size=batch_size,
        sample_rate=sample_rate,
        steps_per_round=steps_per_epoch * local_epochs,
        local_epochs=local_epochs,
        poisson=poisson,
        noise_multiplier=override.noise_multiplier or privacy.noise_multiplier,
        max_grad_norm=override.max_grad_norm or privacy.max_grad_norm,
        accountant=make_accountant(privacy.accountant, privacy.rdp_conversion) if privacy.enabled else None,
        sampler_rng=stream_generator(seeded=seeded, seed=seed, index=index, stream=SAMPLER_STREAM),
        noise_rng=noise_rng,
        seeded=seeded,
    )
