"""Privacy accountants: Opacus's RDP, PRV and GDP accountants, chosen by name."""

from __future__ import annotations

from opacus.accountants import IAccountant, create_accountant

from fl_dp_lightning.config import ACCOUNTANTS


def make_accountant(name: str) -> IAccountant:
    """A fresh accountant: ``rdp`` (Renyi DP), ``prv`` (privacy random variables) or ``gdp`` (Gaussian DP)."""
    if name not in ACCOUNTANTS:
        raise ValueError(f"privacy.accountant={name!r}: choose one of {ACCOUNTANTS}")
    return create_accountant(mechanism=name)


def epsilon_spent(accountant: IAccountant, delta: float) -> float:
    """Epsilon spent so far at ``delta``; 0 before the first step."""
    if len(accountant.history) == 0:
        return 0.0
    return float(accountant.get_epsilon(delta=delta))
