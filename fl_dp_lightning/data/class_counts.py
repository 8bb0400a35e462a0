"""How many records of each class every client holds: the table and picture of a label partition (pure)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

IMAGE_HEIGHT = 400
"""Pixels the heat map's rows take together (at least one per client)."""


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


def counts_heatmap(counts: Tensor, cell_width: int = 24) -> Tensor:
    """A grayscale picture ``[1, H, W]`` in [0, 1]: a row per client, a column per class, brightness the share of
    that client's records in that class."""
    shares = counts.double() / counts.sum(dim=1, keepdim=True).clamp(min=1)
    row_height = max(1, IMAGE_HEIGHT // counts.shape[0])
    image = shares.repeat_interleave(row_height, dim=0).repeat_interleave(cell_width, dim=1)
    return image.float().unsqueeze(0)
