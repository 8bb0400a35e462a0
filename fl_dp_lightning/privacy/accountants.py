"""Privacy accountants: Opacus's RDP, PRV and GDP accountants, and RDP with the classic conversion.

Two RDP-to-(epsilon, delta) conversions are offered:
- ``improved`` (Opacus's default; Balle et al. 2020, Thm 21):
  ``eps = min_a rdp(a) - (log(delta) + log(a)) / (a - 1) + log((a - 1) / a)``
- ``classic`` (Mironov 2017, Prop. 3; what older papers and the seed tutorial report):
  ``eps = min_a rdp(a) - log(delta) / (a - 1)``, over integer orders 2..31 by default.
The classic bound is never smaller; both are valid upper bounds on epsilon.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from opacus.accountants import IAccountant, RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fl_dp_lightning.config import ACCOUNTANTS, RDP_CONVERSIONS

CLASSIC_ORDERS: tuple[int, ...] = tuple(range(2, 32))
"""RDP orders of the classic conversion: 2..31, as in the seed tutorial."""


def classic_rdp_to_dp(orders: Sequence[float], rdp: Sequence[float], delta: float) -> tuple[float, float]:
    """Classic conversion: returns ``(min_a rdp(a) - log(delta) / (a - 1), best order a)``."""
    orders_arr, rdp_arr = np.asarray(orders, dtype=float), np.asarray(rdp, dtype=float)
    eps = rdp_arr - np.log(delta) / (orders_arr - 1)
    best = int(np.nanargmin(eps))
    return float(eps[best]), float(orders_arr[best])


class ClassicRDPAccountant(RDPAccountant):
    """Opacus's RDP accountant, converting to (epsilon, delta) with the classic bound over orders 2..31."""

    def get_privacy_spent(self, *, delta: float, alphas: Sequence[float] | None = None) -> tuple[float, float]:
        if not self.history:
            return 0.0, 0.0
        orders = list(alphas) if alphas is not None else list(CLASSIC_ORDERS)
        rdp = sum(
            rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
            for sigma, q, steps in self.history
        )
        return classic_rdp_to_dp(orders, rdp, delta)


def make_accountant(name: str, conversion: str = "improved") -> IAccountant:
    """A fresh accountant.

    Args:
        name: ``rdp`` (Renyi DP), ``prv`` (privacy random variables) or ``gdp`` (Gaussian DP).
        conversion: for ``rdp``, ``improved`` (Opacus's default) or ``classic``.
    """
    if name not in ACCOUNTANTS:
        raise ValueError(f"privacy.accountant={name!r}: choose one of {ACCOUNTANTS}")
    if conversion not in RDP_CONVERSIONS:
        raise ValueError(f"privacy.rdp_conversion={conversion!r}: choose one of {RDP_CONVERSIONS}")
    if name == "rdp" and conversion == "classic":
        return ClassicRDPAccountant()
    return create_accountant(mechanism=name)


def epsilon_spent(accountant: IAccountant, delta: float) -> float:
    """Epsilon spent so far at ``delta``; 0 before the first step.

    Epsilon depends only on the accountant's kind, its history and delta, so it is computed once per distinct
    history: a thousand clients with the same sample rate cost one computation, not a thousand.
    """
    if len(accountant.history) == 0:
        return 0.0
    return _epsilon(type(accountant), tuple(tuple(entry) for entry in accountant.history), delta)


@lru_cache(maxsize=4096)
def _epsilon(kind: type[IAccountant], history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    accountant = kind()
    accountant.history = [tuple(entry) for entry in history]
    return float(accountant.get_epsilon(delta=delta))
