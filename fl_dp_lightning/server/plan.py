"""The round schedule: which clients train in a round, for how many steps, at which batch indices."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
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
    steps: Mapping[str, int], fraction: float, round_idx: int, seed: int, *, poisson: bool = False
) -> RoundPlan:
    """Samples the round's clients, seeded by ``seed`` and ``round_idx``.

    Args:
        steps: optimizer steps each client makes in a round, in client order.
        fraction: ``uniform``: the fraction of clients that take part (``round(fraction * n)``, at least one,
            without replacement); ``poisson``: each client's probability of taking part, independently of the
            others (a round can then have no client).
        round_idx: the round (0-based); the same round always samples the same clients.
        seed: the run's seed (client sampling is public: it does not depend on any client's data).
        poisson: Poisson client sampling instead of a fixed number per round.
    """
    names = list(steps)
    high, low = np.random.SeedSequence([seed, round_idx]).generate_state(2).tolist()
    gen = torch.Generator().manual_seed(high << 31 | low >> 1)  # 63 bits: a secret seed stays out of reach
    if poisson:
        chosen = [name for name, draw in zip(names, torch.rand(len(names), generator=gen).tolist()) if draw < fraction]
    elif clients_per_round(len(names), fraction) == len(names):
        chosen = names
    else:
        picked = sorted(torch.randperm(len(names), generator=gen)[: clients_per_round(len(names), fraction)].tolist())
        chosen = [names[i] for i in picked]
    return RoundPlan(round_idx, tuple((name, steps[name]) for name in chosen))


def over_budget(plan: RoundPlan, clients: Mapping[str, Any], delta: float, budget: float) -> dict[str, float]:
    """The planned clients whose epsilon at ``delta`` would pass ``budget`` after this round's steps, with that
    epsilon (each client's ``epsilon_after(steps, delta)``)."""
    after = {name: clients[name].epsilon_after(steps, delta) for name, steps in plan.segments}
    return {name: eps for name, eps in after.items() if eps > budget}
