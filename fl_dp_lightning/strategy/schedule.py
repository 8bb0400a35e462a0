"""The round schedule: which clients train in a round, for how many steps, at which batch indices."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class RoundPlan:
    """One round: the clients that train, in order, with their number of optimizer steps.

    Batches are served client after client, so the batch index alone says whose batch it is.
    """

    round_idx: int
    segments: tuple[tuple[str, int], ...]
    starts: dict[int, str] = field(init=False, repr=False)
    ends: dict[int, str] = field(init=False, repr=False)

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

    @property
    def num_batches(self) -> int:
        return sum(steps for _, steps in self.segments)

    @property
    def clients(self) -> list[str]:
        return [name for name, _ in self.segments]

    def without(self, names: set[str]) -> RoundPlan:
        """The same round with ``names`` left out."""
        return RoundPlan(self.round_idx, tuple((n, s) for n, s in self.segments if n not in names))


def clients_per_round(num_clients: int, fraction: float) -> int:
    """How many clients a round samples: ``round(fraction * num_clients)``, at least one."""
    return max(1, round(fraction * num_clients))


def plan_round(steps: Mapping[str, int], fraction: float, round_idx: int, seed: int) -> RoundPlan:
    """Samples the round's clients (uniformly without replacement, seeded by ``seed`` and ``round_idx``).

    Args:
        steps: optimizer steps each client makes in a round, in client order.
        fraction: fraction of clients that take part, in (0, 1].
        round_idx: the round (0-based); the same round always samples the same clients.
        seed: the run's seed.
    """
    names = list(steps)
    m = clients_per_round(len(names), fraction)
    if m == len(names):
        chosen = names
    else:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + round_idx)
        picked = sorted(torch.randperm(len(names), generator=gen)[:m].tolist())
        chosen = [names[i] for i in picked]
    return RoundPlan(round_idx, tuple((name, steps[name]) for name in chosen))
