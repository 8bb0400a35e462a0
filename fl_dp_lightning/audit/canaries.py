"""Canaries for the one-run audit: records whose label a secret fair coin chooses, and their scores.

Each canary slot holds one out-of-distribution input (a random image at the data's scale) and two labels; the
slot's coin puts the input into the audited client's training data with the first label (coin true) or with the
second. Two runs that differ in one coin differ in one record replaced, the adjacency that the product's
accountants state, so the one-run bound applies to the printed replace-one epsilon. A canary's score, read from
the released model only, is how much more likely the model finds the first label than the second.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset, TensorDataset


@dataclass(frozen=True)
class Canaries:
    """``count`` canary slots: inputs, the two labels each may carry, and the secret coins."""

    inputs: Tensor
    """(count, *input shape)."""
    labels: Tensor
    """(count, 2): the label a slot's input carries when its coin is true, and when it is false."""
    coins: Tensor
    """(count,) bool, each true with probability 1/2, drawn from the OS's randomness unless seeded."""

    def __len__(self) -> int:
        return len(self.coins)

    def records(self) -> TensorDataset:
        """The records that enter the training data: each input with the label its coin chose."""
        chosen = self.labels[torch.arange(len(self)), (~self.coins).long()]
        return TensorDataset(self.inputs, chosen)


def draw_canaries(count: int, like: Tensor, num_classes: int, scale: float = 5.0, seed: int | None = None) -> Canaries:
    """``count`` canaries shaped like the records ``like`` (a batch of public inputs): Gaussian images around
    their mean with ``scale`` times their standard deviation, two distinct random labels each, fair coins.
    ``seed`` (tests only) fixes everything; by default the coins are secret."""
    generator = torch.Generator().manual_seed(secrets.randbits(62) if seed is None else seed)
    inputs = like.mean() + scale * like.std() * torch.randn(count, *like.shape[1:], generator=generator)
    first = torch.randint(0, num_classes, (count,), generator=generator)
    second = (first + torch.randint(1, num_classes, (count,), generator=generator)) % num_classes
    coins = torch.rand(count, generator=generator) < 0.5
    return Canaries(inputs.to(like.dtype), torch.stack([first, second], dim=1), coins)


def with_canaries(dataset: Dataset, canaries: Canaries) -> Dataset:
    """``dataset`` followed by the canaries' records (one tensor data set when ``dataset`` is one)."""
    records = canaries.records()
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        x, y = dataset.tensors
        return TensorDataset(torch.cat([x, records.tensors[0].to(x)]), torch.cat([y, records.tensors[1].to(y)]))
    return ConcatDataset([dataset, records])


@torch.no_grad()
def canary_scores(model: nn.Module, canaries: Canaries, batch_size: int = 1024) -> Tensor:
    """Per canary, the log-probability the model gives its first label minus its second (high: coin true)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(canaries), batch_size):
        log_p = torch.log_softmax(model(canaries.inputs[start : start + batch_size].to(device)).float(), dim=1)
        labels = canaries.labels[start : start + batch_size].to(device)
        scores.append((log_p.gather(1, labels[:, :1]) - log_p.gather(1, labels[:, 1:])).squeeze(1).cpu())
    model.train(was_training)
    return torch.cat(scores)


def guess(scores: Tensor, guesses: int) -> tuple[Tensor, Tensor]:
    """The guesser: coin true for the ``guesses // 2`` highest scores, false for as many lowest (the rest
    abstain, as the one-run bound allows). Returns the guessed slots and the guesses."""
    half = guesses // 2
    order = torch.argsort(scores, descending=True)
    slots = torch.cat([order[:half], order[len(order) - half :]])
    return slots, torch.cat([torch.ones(half, dtype=torch.bool), torch.zeros(half, dtype=torch.bool)])
