"""Federated averaging as pure functions over state dicts.

Accumulation runs in float64 so that averaging one client, or identical clients, gives back the exact
weights; the result is cast back to each tensor's dtype. Inputs are never modified.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import torch
from torch import Tensor

StateDict = Mapping[str, Tensor]


def averaged_keys(state: StateDict, only: Collection[str] | None = None) -> list[str]:
    """Keys that FedAvg averages: floating-point tensors (integer buffers such as counters are kept), restricted
    to ``only`` when given (under DP, the parameters: buffers keep their global values)."""
    return [key for key, value in state.items() if value.is_floating_point() and (only is None or key in only)]


def weighted_sum(states: Sequence[StateDict], weights: Sequence[float]) -> dict[str, Tensor]:
    """Returns ``sum_i weights[i] * states[i]`` (float64) over the keys of :func:`averaged_keys`."""
    if len(states) != len(weights):
        raise ValueError(f"got {len(states)} states but {len(weights)} weights")
    if not states:
        raise ValueError("need at least one state to sum")
    keys = averaged_keys(states[0])
    return {k: sum(float(w) * s[k].detach().double() for s, w in zip(states, weights)) for k in keys}


def fedavg(states: Sequence[StateDict], weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """Federated averaging: ``sum_i w_i * state_i / sum_i w_i``.

    Args:
        states: client state dicts with the same keys and shapes.
        weights: non-negative weight of each client, usually its number of training examples;
            ``None`` weighs clients equally.

    Returns:
        A new state dict; floating-point entries are averaged, other entries come from ``states[0]``.
    """
    weights = [1.0] * len(states) if weights is None else [float(w) for w in weights]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    return finish_average(states[0], weighted_sum(states, weights), sum(weights))


def finish_average(template: StateDict, summed: Mapping[str, Tensor], total_weight: float) -> dict[str, Tensor]:
    """Divides a weighted sum by its total weight, casting to ``template``'s dtypes and devices.

    Entries of ``template`` that were not summed (integer buffers) are copied from it.
    """
    out = {k: v.detach().clone() for k, v in template.items()}
    for key, value in summed.items():
        out[key] = (value / total_weight).to(dtype=template[key].dtype, device=template[key].device)
    return out


class RunningAverage:
    """FedAvg computed one client at a time, so a round holds one sum, not one model per client.

    ``add`` accumulates the same float64 sum as :func:`weighted_sum`; ``result`` equals :func:`fedavg` of
    everything added. ``summed`` and ``total_weight`` are exposed so processes can all-reduce them.

    Args:
        only: the keys to average (see :func:`averaged_keys`); the others keep the template's values.
    """

    def __init__(self, only: Collection[str] | None = None) -> None:
        self.only = only
        self.summed: dict[str, Tensor] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, state: StateDict, weight: float, client: str | None = None) -> None:
        """Adds ``weight * state`` to the sum (``client``, who adds it, matters only to a secure sum)."""
        if weight < 0:
            raise ValueError(f"weight must be non-negative, got {weight}")
        for key in averaged_keys(state, self.only):
            term = float(weight) * state[key].detach().double()
            self.summed[key] = self.summed[key] + term if key in self.summed else term
        self.total_weight += float(weight)
        self.count += 1

    def result(self, template: StateDict) -> dict[str, Tensor]:
        """The weighted average, shaped like ``template`` (whose non-float entries are kept)."""
        if self.total_weight <= 0:
            raise ValueError("no client with positive weight was added to this round's average")
        return finish_average(template, self.summed, self.total_weight)


def combine_processes(average: RunningAverage, template: StateDict, all_reduce: Callable[[Tensor], None]) -> None:
    """Adds every process's partial sum and total weight into ``average``, in place, with one ``all_reduce`` (an
    in-place sum over processes) of one flat float64 tensor; keys a process never summed count as zeros."""
    keys = averaged_keys(template, average.only)
    parts = [
        average.summed.get(k, torch.zeros(template[k].shape, dtype=torch.float64, device=template[k].device))
        for k in keys
    ]
    flat = torch.cat([p.flatten() for p in parts] + [parts[0].new_tensor([average.total_weight])])
    all_reduce(flat)
    summed, offset = {}, 0
    for key, part in zip(keys, parts):
        summed[key] = flat[offset : offset + part.numel()].view(part.shape)
        offset += part.numel()
    average.summed, average.total_weight = summed, float(flat[-1])
