"""The round schedule: which clients train in a round, for how many steps, at which batch indices."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fl_dp_lightning.config.client import rounds_per_epoch


@dataclass(frozen=True)
class RoundPlan:
    """One round: the clients that train, in order, with their number of optimizer steps.

    Batches are served client after client, so the batch index alone says whose batch it is.
    """

    round_idx: int
    segments: tuple[tuple[str, int], ...]
    starts: dict[int, str] = field(init=False, repr=False)
    ends: dict[int, str] = field(init=False, repr=False)
    num_batches: int = field(init=False, repr=False)
    """Batches in the round (read every step: computed once)."""

    def __post_init__(self) -> None:
        starts, ends, position = {}, {}, 0
        for name, steps in self.segments:
            if steps < 1:
                raise ValueError(f"client {name!r} has {steps} steps in round {self.round_idx}")
            starts[position] = name
            position += steps
            ends[position - 1] = name
        object.__setattr__(self, "starts", starts)
        object.__setattr__(self, "ends", ends)
        object.__setattr__(self, "num_batches", position)

    @property
    def clients(self) -> list[str]:
        return [name for name, _ in self.segments]

    def without(self, names: set[str]) -> RoundPlan:
        """The same round with ``names`` left out."""
        return RoundPlan(self.round_idx, tuple((n, s) for n, s in self.segments if n not in names))


def clients_per_round(num_clients: int, fraction: float) -> int:
    """How many clients a round samples: ``round(fraction * num_clients)``, at least one."""
    return max(1, round(fraction * num_clients))


def plan_round(
    steps: Mapping[str, int], fraction: float, round_idx: int, seed: int, *, sampling: str = "uniform"
) -> RoundPlan:
    """Samples the round's clients, seeded by ``seed`` and ``round_idx``.

    Args:
        steps: optimizer steps each client makes in a round, in client order.
        fraction: ``uniform``: the fraction of clients that take part (``round(fraction * n)``, at least one,
            without replacement); ``poisson``: each client's probability of taking part, independently of the
            others (a round can then have no client); ``epoch``: one over the rounds of an epoch.
        round_idx: the round (0-based); the same round always samples the same clients.
        seed: the run's seed (client sampling is public: it does not depend on any client's data).
        sampling: ``uniform``, ``poisson`` or ``epoch`` (each client in one round of each epoch, see
            :func:`epoch_round`).
    """
    names = list(steps)
    if sampling == "epoch":
        epoch, position = divmod(round_idx, rounds_per_epoch(fraction))
        chosen = [name for name in names if epoch_round(name, epoch, fraction, seed) == position]
        return RoundPlan(round_idx, tuple((name, steps[name]) for name in chosen))
    gen = torch.Generator().manual_seed(seed_of([seed, round_idx]))
    if sampling == "poisson":
        chosen = [name for name, draw in zip(names, torch.rand(len(names), generator=gen).tolist()) if draw < fraction]
    elif clients_per_round(len(names), fraction) == len(names):
        chosen = names
    else:
        picked = sorted(torch.randperm(len(names), generator=gen)[: clients_per_round(len(names), fraction)].tolist())
        chosen = [names[i] for i in picked]
    return RoundPlan(round_idx, tuple((name, steps[name]) for name in chosen))


def seed_of(entropy: list[int]) -> int:
    """A 63-bit generator seed from ``entropy`` (a secret seed stays out of reach)."""
    high, low = np.random.SeedSequence(entropy).generate_state(2).tolist()
    return high << 31 | low >> 1


def epoch_round(name: str, epoch: int, fraction: float, seed: int) -> int:
    """The round of ``epoch`` (0-based, within the epoch) in which client ``name`` takes part under
    ``client.sampling=epoch``: drawn from the seed, the epoch and the client's own name alone, so adding or
    removing a client moves no other client's round (what DP-FTRL's add/remove accounting needs)."""
    name_key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    gen = torch.Generator().manual_seed(seed_of([seed, epoch, name_key]))
    return int(torch.randint(rounds_per_epoch(fraction), (), generator=gen))


def over_budget(plan: RoundPlan, clients: Mapping[str, Any], delta: float, budget: float) -> dict[str, float]:
    """The planned clients whose epsilon at ``delta`` would pass ``budget`` after this round's steps, with that
    epsilon (each client's ``epsilon_after(steps, delta)``)."""
    after = {name: clients[name].epsilon_after(steps, delta) for name, steps in plan.segments}
    return {name: eps for name, eps in after.items() if eps > budget}
