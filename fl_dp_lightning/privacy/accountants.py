"""Privacy accountants under replace-one adjacency.

Each client's record count n is public here (it sets the FedAvg weight, the sample rate q = B / n and the step
count), so the guarantee is stated for data sets of the same size that differ in one record (replace-one).
Poisson subsampling analysed as add/remove would understate epsilon (the seed workload: 0.75 add/remove,
0.94 replace-one).

- ``pld`` (default): the privacy loss distribution of the Poisson-subsampled Gaussian under replace-one
  (Google's dp-accounting, pessimistic discretisation: an upper bound within 1 % of the exact value).
- ``rdp``: Opacus's add/remove RDP of the subsampled Gaussian, carried to replace-one through the replacement's
  intermediate data set (one record removed) with the weak triangle inequality of Renyi divergence
  (Mironov 2017, Prop. 11, p = q = 2): ``rdp_r(a) <= (a - 1/2) / (a - 1) * rdp(2a) + rdp(2a - 1)``. A valid but
  looser bound; converted to (epsilon, delta) with ``improved`` (Balle et al. 2020, Opacus's default) or
  ``classic`` (Mironov 2017, Prop. 3) conversion.
- ``gdp``: Opacus's central-limit Gaussian-DP approximation (add/remove). Not an upper bound; reported as an
  approximation only, and refused where a number must be guaranteed (targets, budgets).

Every accountant keeps Opacus's state: ``history`` of ``(noise_multiplier, sample_rate, steps)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from opacus.accountants import GaussianAccountant, IAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fl_dp_lightning.config import ACCOUNTANTS, RDP_CONVERSIONS

CLASSIC_ORDERS: tuple[int, ...] = tuple(range(2, 32))
"""RDP orders of the classic conversion: 2..31, as in the seed tutorial."""

ORDERS: tuple[float, ...] = tuple(a for a in RDPAccountant.DEFAULT_ALPHAS if a > 1)
"""RDP orders of the improved conversion (Opacus's grid; order 1 has no replace-one bound)."""

ADJACENCY = "replace-one"
"""The adjacency every guaranteed epsilon is computed for."""

PLD_DISCRETIZATION = 1e-3
"""Grid of the privacy loss distribution. Rounding is pessimistic, so epsilon stays an upper bound; 1e-3 is
within 1 % of dp-accounting's default 1e-4 and 10x faster (budgets and calibration evaluate many histories)."""


def classic_rdp_to_dp(orders: Sequence[float], rdp: Sequence[float], delta: float) -> tuple[float, float]:
    """Classic conversion: returns ``(min_a rdp(a) - log(delta) / (a - 1), best order a)``."""
    orders_arr, rdp_arr = np.asarray(orders, dtype=float), np.asarray(rdp, dtype=float)
    eps = rdp_arr - np.log(delta) / (orders_arr - 1)
    best = int(np.nanargmin(eps))
    return float(eps[best]), float(orders_arr[best])


def add_remove_rdp(history: Sequence[tuple[float, float, int]], orders: Sequence[float]) -> np.ndarray:
    """RDP of the composed Poisson-subsampled Gaussian steps under add/remove adjacency (Opacus's analysis)."""
    return sum(
        rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(orders))
        for sigma, q, steps in history
    )


def replace_one_rdp(history: Sequence[tuple[float, float, int]], orders: Sequence[float]) -> np.ndarray:
    """RDP under replace-one: D -> D minus x -> D minus x plus x', joined by the weak triangle inequality."""
    a = np.asarray(orders, dtype=float)
    if np.any(a <= 1):
        raise ValueError("replace-one RDP needs orders > 1")
    return (a - 0.5) / (a - 1) * add_remove_rdp(history, 2 * a) + add_remove_rdp(history, 2 * a - 1)


class ReplaceOneRDPAccountant(RDPAccountant):
    """Opacus's RDP accountant (same ``step``/``history``), reporting the replace-one bound."""

    conversion = "improved"

    def get_privacy_spent(self, *, delta: float, alphas: Sequence[float] | None = None) -> tuple[float, float]:
        if not self.history:
            return 0.0, 0.0
        if self.conversion == "classic":
            orders = list(alphas) if alphas is not None else list(CLASSIC_ORDERS)
            return classic_rdp_to_dp(orders, replace_one_rdp(self.history, orders), delta)
        orders = list(alphas) if alphas is not None else list(ORDERS)
        eps, order = rdp_analysis.get_privacy_spent(
            orders=orders, rdp=replace_one_rdp(self.history, orders), delta=delta
        )
        return float(eps), float(order)


class ClassicReplaceOneRDPAccountant(ReplaceOneRDPAccountant):
    """:class:`ReplaceOneRDPAccountant` with the classic RDP conversion over orders 2..31."""

    conversion = "classic"


class ReplaceOnePLDAccountant(RDPAccountant):
    """Privacy loss distribution accountant (dp-accounting) under replace-one; Opacus's ``step``/``history``."""

    relation = "REPLACE_ONE"

    @classmethod
    def mechanism(cls) -> str:
        return "pld"

    def get_epsilon(self, delta: float, **kwargs: object) -> float:
        if not self.history:
            return 0.0
        return pld_epsilon(tuple(tuple(h) for h in self.history), delta, self.relation)

    def get_privacy_spent(self, *, delta: float, alphas: object = None) -> tuple[float, float]:
        return self.get_epsilon(delta), float("nan")


class AddRemovePLDAccountant(ReplaceOnePLDAccountant):
    """The PLD accountant under add/remove adjacency: user-level DP, where one client's whole data is added or
    removed and the number of clients is not public."""

    relation = "ADD_OR_REMOVE_ONE"


def pld_epsilon(history: Sequence[tuple[float, float, int]], delta: float, relation: str = "REPLACE_ONE") -> float:
    """Epsilon at ``delta`` of the composed steps in ``history``, from dp-accounting's PLD, under ``relation``
    (a ``dp_accounting.NeighboringRelation`` name: replace-one by default)."""
    import dp_accounting

    accountant = dp_accounting.pld.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation[relation],
        value_discretization_interval=PLD_DISCRETIZATION,
    )
    for sigma, q, steps in history:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), int(steps))
    return float(accountant.get_epsilon(delta))


def make_accountant(name: str, conversion: str = "improved") -> IAccountant:
    """A fresh accountant.

    Args:
        name: ``pld`` (exact replace-one), ``rdp`` (replace-one RDP bound) or ``gdp`` (approximation).
        conversion: for ``rdp``, ``improved`` (Opacus's default) or ``classic``.
    """
    if name not in ACCOUNTANTS:
        raise ValueError(f"privacy.accountant={name!r}: choose one of {ACCOUNTANTS}")
    if conversion not in RDP_CONVERSIONS:
        raise ValueError(f"privacy.rdp_conversion={conversion!r}: choose one of {RDP_CONVERSIONS}")
    if name == "pld":
        return ReplaceOnePLDAccountant()
    if name == "gdp":
        return GaussianAccountant()
    return ClassicReplaceOneRDPAccountant() if conversion == "classic" else ReplaceOneRDPAccountant()


def make_user_accountant(name: str) -> IAccountant:
    """A fresh user-level accountant (add/remove one client): ``pld`` (dp-accounting), ``rdp`` (Opacus's RDP,
    improved conversion) or ``prv`` (Opacus's privacy random variables)."""
    from opacus.accountants import PRVAccountant

    kinds = {"pld": AddRemovePLDAccountant, "rdp": RDPAccountant, "prv": PRVAccountant}
    if name not in kinds:
        raise ValueError(f"user_privacy.accountant={name!r}: choose one of {tuple(kinds)}")
    return kinds[name]()


def epsilon_spent(accountant: IAccountant, delta: float) -> float:
    """Epsilon spent so far at ``delta``; 0 before the first step.

    Epsilon depends only on the accountant's kind, its history and delta, so it is computed once per distinct
    history: a thousand clients with the same sample rate cost one computation, not a thousand.
    """
    return epsilon_of_history(type(accountant), accountant.history, delta)


def epsilon_of_history(kind: type[IAccountant], history: Sequence[Sequence[float]], delta: float) -> float:
    """Epsilon at ``delta`` of an accountant of ``kind`` holding ``history`` ((noise, sample rate, steps) entries):
    what a client would reach, or a bound from public settings, without touching its own accountant."""
    if len(history) == 0:
        return 0.0
    return _epsilon(kind, tuple(tuple(entry) for entry in history), delta)


@lru_cache(maxsize=4096)
def _epsilon(kind: type[IAccountant], history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    accountant = kind()
    accountant.history = [tuple(entry) for entry in history]
    return float(accountant.get_epsilon(delta=delta))
