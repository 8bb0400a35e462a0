"""Splitting a training set among clients: pure functions from labels/sizes to index tensors."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fl_dp_lightning.config import ConfigError


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[Tensor]:
    """Shuffles ``range(num_examples)`` and cuts it into ``num_clients`` near-equal shares.

    Share sizes differ by at most one; every index lands in exactly one share.
    """
    if num_clients < 1 or num_examples < num_clients:
        raise ConfigError(
            f"client.count={num_clients}: cannot split {num_examples} examples among {num_clients} clients; use fewer"
        )
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed))
    return list(torch.tensor_split(order, num_clients))


def dirichlet_partition(labels: Tensor, num_clients: int, alpha: float, seed: int) -> list[Tensor]:
    """Label-skewed split: each class is divided among clients in Dirichlet(alpha) proportions.

    Every index lands in exactly one share; smaller ``alpha`` gives more skew.
    """
    if num_clients < 1 or alpha <= 0:
        raise ValueError(f"need num_clients >= 1 and alpha > 0, got {num_clients} and {alpha}")
    rng = np.random.default_rng(seed)
    labels_np = labels.cpu().numpy()
    shares: list[list[int]] = [[] for _ in range(num_clients)]
    for cls in np.unique(labels_np):
        members = rng.permutation(np.flatnonzero(labels_np == cls))
        cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients))[:-1] * len(members)).astype(int)
        for share, part in zip(shares, np.split(members, cuts)):
            share.extend(part.tolist())
    return [torch.tensor(sorted(share), dtype=torch.long) for share in shares]


def shard_partition(labels: Tensor, num_clients: int, shards_per_client: int, seed: int) -> list[Tensor]:
    """Label shards (McMahan et al. 2017): sort by label, cut into ``num_clients * shards_per_client`` equal
    shards, deal each client ``shards_per_client`` of them at random. Each client sees few classes.

    Every index lands in exactly one share (the last ``len % shards`` sorted indices join the last shard).
    """
    shards = num_clients * shards_per_client
    if num_clients < 1 or shards_per_client < 1 or len(labels) < shards:
        raise ConfigError(
            f"client.shards_per_client={shards_per_client}: {len(labels)} examples cannot make "
            f"{num_clients} x {shards_per_client} shards; use fewer clients or shards"
        )
    order = torch.sort(labels.cpu(), stable=True).indices
    pieces = list(torch.tensor_split(order, shards))
    dealt = torch.randperm(shards, generator=torch.Generator().manual_seed(seed)).tolist()
    return [
        torch.sort(torch.cat([pieces[s] for s in dealt[c * shards_per_client : (c + 1) * shards_per_client]])).values
        for c in range(num_clients)
    ]


def quantity_skew_partition(num_examples: int, num_clients: int, sigma: float, seed: int) -> list[Tensor]:
    """Quantity skew: client sizes proportional to log-normal(0, ``sigma``) draws (at least one example each),
    records assigned at random, so labels stay IID while sizes differ; ``sigma = 0`` is the IID split."""
    if num_clients < 1 or num_examples < num_clients:
        raise ConfigError(
            f"client.count={num_clients}: cannot split {num_examples} examples among {num_clients} clients; use fewer"
        )
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, sigma, num_clients)
    spare = num_examples - num_clients
    sizes = 1 + np.floor(weights / weights.sum() * spare).astype(int)
    sizes[np.argsort(-weights)[: num_examples - sizes.sum()]] += 1  # hand out the rounding remainder
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed))
    return list(torch.split(order, sizes.tolist()))


def holdout_split(num_examples: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded split of ``range(num_examples)`` into (train, holdout) indices, the holdout ``round(fraction * n)``
    records (at least one when ``fraction`` > 0, and never all)."""
    size = min(num_examples - 1, max(1, round(fraction * num_examples))) if fraction > 0 else 0
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed))
    return order[size:].sort().values, order[:size].sort().values
