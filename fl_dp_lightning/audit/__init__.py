"""Empirical privacy audits: a measured lower bound on epsilon beside the accountant's upper bound."""

from fl_dp_lightning.audit.bounds import clopper_pearson, membership_lower_bound, one_run_lower_bound, one_run_p_value
from fl_dp_lightning.audit.canaries import Canaries, canary_scores, draw_canaries, guess, with_canaries
from fl_dp_lightning.audit.dirac import DiracCanaries, draw_dirac_canaries
from fl_dp_lightning.audit.run import OneRunAudit

__all__ = [
    "Canaries",
    "DiracCanaries",
    "OneRunAudit",
    "canary_scores",
    "clopper_pearson",
    "draw_canaries",
    "draw_dirac_canaries",
    "guess",
    "membership_lower_bound",
    "one_run_lower_bound",
    "one_run_p_value",
    "with_canaries",
]
