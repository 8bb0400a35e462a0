"""How many records of each class every client holds: the table of a label partition (pure)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def class_counts(labels: Mapping[str, Tensor], num_classes: int | None = None) -> Tensor:
    """``[clients, classes]`` counts, in the order of ``labels`` (client name -> its integer labels)."""
    num_classes = num_classes or 1 + max(int(y.max()) for y in labels.values() if len(y))
    return torch.stack([torch.bincount(y.long(), minlength=num_classes) for y in labels.values()])


def counts_markdown(names: list[str], counts: Tensor) -> str:
    """A markdown table: one row per client, one column per class, and the client's total."""
    classes = range(counts.shape[1])
    lines = [
        "| client | " + " | ".join(str(c) for c in classes) + " | total |",
        "|---|" + "---|" * (len(classes) + 1),
    ]
    for name, row in zip(names, counts.tolist()):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + f" | {sum(row)} |")
    return "\n".join(lines)
