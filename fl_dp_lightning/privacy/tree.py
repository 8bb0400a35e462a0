"""Tree aggregation for DP-FTRL (Kairouz et al. 2021, "Practical and Private (Deep) Learning without Sampling or
Shuffling"), with a restart at every epoch.

Within an epoch of R rounds the server releases noised prefix sums ``s_t = x_1 + ... + x_t + N(t)`` of the rounds'
sums of clipped client updates. ``N(t)`` is the sum of the Gaussian noises of the binary-tree nodes that cover
``[1, t]``: node ``(level l, index k)`` covers rounds ``k * 2^l + 1 .. (k + 1) * 2^l`` and draws its noise once.
The round's release is the difference ``s_t - s_(t-1)``: this round's sum plus ``N(t) - N(t-1)``, so the server's
optimizer runs on it as on DP-FedAvg's sum (post-processing of the prefix sums).

A client takes part in at most one round of an epoch, so its update lies in at most ``depth`` released nodes of
that epoch's tree (``depth = ceil(log2(R + 1))``, the levels a leaf belongs to); each node's noise has standard
deviation ``z * clip``. Over epochs the releases compose as one Gaussian mechanism of sensitivity
``sqrt(sum of depths) * clip``: each epoch is accounted as one Gaussian step of noise multiplier
``z / sqrt(depth)``, which is dp-accounting's ``SingleEpochTreeAggregationDpEvent``. A tree that restarts inside
an epoch (a resumed run whose node noise was secret) is accounted with the deepest of that epoch's trees, since a
client's one round lies in one of them. Pure functions over numbers, and the noise state of one tree.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

from torch import Tensor

Noise = dict[str, Tensor]


def tree_depth(leaves: int) -> int:
    """Released nodes a leaf of a tree over ``leaves`` rounds lies in at most: ``ceil(log2(leaves + 1))``."""
    return leaves.bit_length()


def epoch_depths(rounds: int, rounds_per_epoch: int) -> list[int]:
    """The tree depth of each epoch (the last one partial) after ``rounds`` rounds of an uninterrupted run."""
    full, rest = divmod(rounds, rounds_per_epoch)
    return [tree_depth(rounds_per_epoch)] * full + ([tree_depth(rest)] if rest else [])


def tree_history(noise_multiplier: float, depths: Sequence[int]) -> list[tuple[float, float, int]]:
    """An accountant's history for epochs of the given depths: per epoch one Gaussian step (sample rate 1) of
    noise multiplier ``noise_multiplier / sqrt(depth)``, equal depths grouped."""
    counts = Counter(d for d in depths if d > 0)
    return [(noise_multiplier / math.sqrt(d), 1.0, n) for d, n in sorted(counts.items())]


class TreeNoise:
    """The noise of one tree's released nodes, advanced one round (leaf) at a time.

    Only the nodes that the latest prefix sum uses are kept (at most ``depth``, one per level): the next prefix
    keeps those above the new node's level and drops those below it.
    """

    def __init__(self) -> None:
        self.leaves = 0
        """Rounds this tree has released."""
        self.nodes: dict[int, Noise] = {}
        """The noise of the nodes in the latest prefix sum, by level."""

    def next(self, fresh: Noise) -> Noise:
        """``N(t) - N(t-1)`` for the tree's next round ``t``, given the new node's noise ``fresh`` (standard
        deviation ``z * clip``): ``fresh`` minus the nodes it replaces."""
        self.leaves += 1
        level = (self.leaves & -self.leaves).bit_length() - 1  # the new node's level: trailing zeros of t
        dropped = [self.nodes.pop(lower) for lower in range(level)]
        self.nodes[level] = fresh
        return {k: fresh[k] - sum(node[k] for node in dropped) if dropped else fresh[k] for k in fresh}

    def state_dict(self) -> dict[str, object]:
        return {"leaves": self.leaves, "nodes": {level: dict(noise) for level, noise in self.nodes.items()}}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.leaves = int(state["leaves"])
        self.nodes = {int(level): dict(noise) for level, noise in state["nodes"].items()}
