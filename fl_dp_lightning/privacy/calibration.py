"""Choosing the noise multiplier that reaches a target epsilon (pure: numbers in, number out)."""

from __future__ import annotations

import warnings

from fl_dp_lightning.config import MIN_NOISE_MULTIPLIER, ConfigError
from fl_dp_lightning.privacy.accountants import epsilon_spent, make_accountant

MAX_NOISE_MULTIPLIER = 1e4


def epsilon_for(
    noise_multiplier: float, *, sample_rate: float, steps: int, delta: float, accountant: str, conversion: str
) -> float:
    """Epsilon after ``steps`` Poisson-sampled Gaussian steps, from a fresh accountant of the given kind."""
    acc = make_accountant(accountant, conversion)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():  # trial points far from the answer hit the ends of the order grid
        warnings.simplefilter("ignore")
        return epsilon_spent(acc, delta)


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    conversion: str = "improved",
    tolerance: float = 0.005,
) -> float:
    """The smallest noise multiplier (to ``tolerance``) whose epsilon is at most ``target_epsilon``.

    Returns sigma with ``(1 - tolerance) * target_epsilon <= epsilon(sigma) <= target_epsilon``.

    Raises:
        ValueError: if the target needs a noise multiplier above 1e4 (the target is unreachable).
    """
    if target_epsilon <= 0 or steps < 1 or not 0 < sample_rate <= 1:
        raise ValueError(
            f"need target_epsilon > 0, steps >= 1, 0 < sample_rate <= 1; got {target_epsilon}, {steps}, {sample_rate}"
        )

    def eps(sigma: float) -> float:
        return epsilon_for(
            sigma, sample_rate=sample_rate, steps=steps, delta=delta, accountant=accountant, conversion=conversion
        )

    if eps(MIN_NOISE_MULTIPLIER) <= target_epsilon:
        raise ConfigError(
            f"privacy.target_epsilon={target_epsilon} needs a noise multiplier below {MIN_NOISE_MULTIPLIER}, where DP "
            "protects nothing; lower the target (single digits are usual)"
        )
    low, high = MIN_NOISE_MULTIPLIER, 1.0
    while eps(high) > target_epsilon:
        low, high = high, 2 * high
        if high > MAX_NOISE_MULTIPLIER:
            raise ConfigError(
                f"privacy.target_epsilon={target_epsilon} is out of reach at delta={delta} with sample rate "
                f"{sample_rate:.4g} over {steps} steps: raise the target, train fewer rounds or use larger clients"
            )
    # invariant: eps(low) > target >= eps(high); bisect until eps(high) is within tolerance under the target
    # (the target is above eps(1) only when high = 1, which the check above keeps above the floor)
    while eps(high) < (1 - tolerance) * target_epsilon and high - low > 1e-9:
        mid = (low + high) / 2
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high
