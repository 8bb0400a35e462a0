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
