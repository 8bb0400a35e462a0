"""Choosing the noise multiplier that reaches a target epsilon (pure: numbers in, number out)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

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
    """The smallest noise multiplier (to ``tolerance``) whose record-level epsilon is at most ``target_epsilon``.

    Returns sigma with ``(1 - tolerance) * target_epsilon <= epsilon(sigma) <= target_epsilon``.
    """
    if target_epsilon <= 0 or steps < 1 or not 0 < sample_rate <= 1:
        raise ValueError(
            f"need target_epsilon > 0, steps >= 1, 0 < sample_rate <= 1; got {target_epsilon}, {steps}, {sample_rate}"
        )

    def eps(sigma: float) -> float:
        return epsilon_for(
            sigma, sample_rate=sample_rate, steps=steps, delta=delta, accountant=accountant, conversion=conversion
        )

    reach = f"at delta={delta} with sample rate {sample_rate:.4g} over {steps} steps"
    key = "privacy.target_epsilon"
    return smallest_noise_multiplier(eps, target_epsilon, key=key, reach=reach, tolerance=tolerance)


def smallest_noise_multiplier(
    epsilon: Callable[[float], float],
    target_epsilon: float,
    *,
    key: str,
    reach: str = "",
    tolerance: float = 0.005,
) -> float:
    """The smallest sigma (to ``tolerance``) with ``epsilon(sigma) <= target_epsilon``, by bisection (``epsilon``
    falls as sigma grows). ``key`` names the setting in the errors.

    Raises:
        ConfigError: if the target needs sigma below the floor or above 1e4 (out of reach).
    """
    with warnings.catch_warnings():  # trial points far from the answer hit the ends of the order grid
        warnings.simplefilter("ignore")
        return _bisect(epsilon, target_epsilon, key, reach, tolerance)


def _bisect(epsilon: Callable[[float], float], target: float, key: str, reach: str, tolerance: float) -> float:
    if epsilon(MIN_NOISE_MULTIPLIER) <= target:
        raise ConfigError(
            f"{key}={target} needs a noise multiplier below {MIN_NOISE_MULTIPLIER}, where DP protects nothing; lower "
            "the target (single digits are usual)"
        )
    low, high = MIN_NOISE_MULTIPLIER, 1.0
    while epsilon(high) > target:
        low, high = high, 2 * high
        if high > MAX_NOISE_MULTIPLIER:
            raise ConfigError(
                f"{key}={target} is out of reach{' ' + reach if reach else ''}: raise the target, train fewer rounds "
                "or use more (or larger) clients"
            )
    # invariant: eps(low) > target >= eps(high); bisect until eps(high) is within tolerance under the target
    while epsilon(high) < (1 - tolerance) * target and high - low > 1e-9:
        mid = (low + high) / 2
        if epsilon(mid) > target:
            low = mid
        else:
            high = mid
    return high
