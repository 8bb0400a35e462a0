"""User-level DP at the server: DP-FedAvg (McMahan et al. 2018) with adaptive clipping (Andrew et al. 2021).

Each sampled client's update (its weights minus the global model's) is clipped to L2 norm S; the server adds
Gaussian noise of standard deviation z * S to the sum and divides by the expected number of clients (a fixed
denominator, so that one client's presence changes the sum by at most S). With adaptive clipping each client also
reports whether its update fitted under S, as the centred bit ``b - 1/2`` (so one client moves the count by at most
1/2, the sensitivity Andrew et al.'s noise split assumes); the server adds noise to that count and moves S towards
the target quantile of update norms. Pure functions over tensors and numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor


def update_norm(update: Mapping[str, Tensor]) -> float:
    """The L2 norm of a whole update (all its tensors as one vector)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))


def clip_update(update: Mapping[str, Tensor], clip: float) -> tuple[dict[str, Tensor], float]:
    """The update scaled to L2 norm at most ``clip`` (unchanged when it fits), and its norm before clipping."""
    norm = update_norm(update)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return {name: t * factor for name, t in update.items()}, norm


def noised_mean(
    summed: Mapping[str, Tensor],
    *,
    clip: float,
    noise_multiplier: float,
    expected_clients: float,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """``(sum of clipped updates + N(0, (noise_multiplier * clip)^2)) / expected_clients``, tensor by tensor."""
    noise = gaussian_like(summed, noise_multiplier * clip, generator)
    return {name: (t + noise[name]) / expected_clients for name, t in summed.items()}


def gaussian_like(like: Mapping[str, Tensor], std: float, generator: torch.Generator) -> dict[str, Tensor]:
    """``N(0, std^2)`` noise shaped, typed and placed as each tensor of ``like``, drawn in its order."""
    return {
        name: torch.normal(0.0, std, t.shape, generator=generator, dtype=t.dtype, device=t.device)
        for name, t in like.items()
    }


COUNT_SENSITIVITY = 0.5
"""How far one client moves the released count: its centred bit ``b - 1/2`` is -1/2 or +1/2 (add/remove)."""


def fitted_bit(norm: float, clip: float) -> float:
    """A client's centred count bit: +1/2 when its update fitted under the clip, else -1/2."""
    return (1.0 if norm <= clip else 0.0) - 0.5


def update_noise_multiplier(noise_multiplier: float, count_std: float) -> float:
    """The noise multiplier left for the updates when the clipped-count query takes its share (Andrew et al. 2021,
    Thm. 1): both together are one Gaussian mechanism of ``noise_multiplier``, so
    ``z_update^-2 + (COUNT_SENSITIVITY / count_std)^2 = z^-2``."""
    share = noise_multiplier**-2 - (COUNT_SENSITIVITY / count_std) ** 2
    if share <= 0:
        raise ValueError(
            f"count noise {count_std:g} leaves nothing of noise multiplier {noise_multiplier:g} for the updates: "
            f"it must exceed z * {COUNT_SENSITIVITY:g} = {noise_multiplier * COUNT_SENSITIVITY:.3g}"
        )
    return share**-0.5


def noised_count(centred: float, *, count_std: float, generator: torch.Generator) -> float:
    """The released count: the sum of the clients' centred bits plus Gaussian noise of ``count_std``."""
    return centred + float(torch.normal(0.0, count_std, (), generator=generator))


def fraction_fitted(count: float, expected_clients: float) -> float:
    """The fraction of clients whose update fitted, estimated from a released centred count (post-processing)."""
    return count / expected_clients + 0.5


def next_clip(clip: float, fraction_fitted: float, *, target_quantile: float, learning_rate: float) -> float:
    """Geometric update of the clip norm towards the ``target_quantile`` of update norms:
    ``S * exp(-learning_rate * (fraction_fitted - target_quantile))``."""
    return clip * math.exp(-learning_rate * (fraction_fitted - target_quantile))
