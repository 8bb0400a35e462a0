"""The empirical privacy audit (``audit=``): canaries in one client's data and a lower bound on its epsilon."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fl_dp_lightning.config.choices import AUDIT_CANARIES, AUDIT_METHODS
from fl_dp_lightning.config.errors import require


@dataclass
class AuditConfig:
    """An audit run trains with the audit's canaries among one client's records: its model is evidence about the
    mechanism, not a model to release (see :mod:`fl_dp_lightning.audit`)."""

    method: str = "none"
    """``none`` or ``one_run`` (Steinke, Nasr and Jagielski 2023: one training run with many canaries)."""
    canary: str = "dirac"
    """``dirac``: white-box canaries, records whose gradient is zero but in one coordinate of the trained
    parameters, where its sign is the secret coin (strong: DP-SGD bounds any gradient). ``input``: black-box
    canaries, out-of-distribution images whose label the coin chooses (what an adversary holding only records can
    insert)."""
    canaries: int = 1000
    """Canary slots added to the audited client's training records (each holds one record)."""
    canary_norm: float = 10.0
    """For ``canary=dirac``: each canary gradient's L2 norm before clipping, in gradient units. DP-SGD clips it
    to ``privacy.max_grad_norm`` as any record's; without DP nothing bounds a record's gradient, and a large one
    shows it."""
    canary_scale: float = 5.0
    """For ``canary=input``: spread of a canary's pixels, in standard deviations of the shared public set's
    pixels (a canary is a Gaussian image around their mean): far from the data, so that a model that memorizes
    records shows it."""
    guesses: int = 100
    """Canaries the auditor guesses about, half as included with their first label and half with their second;
    the others abstain. Fewer, surer guesses give a higher bound when the model leaks little."""
    confidence: float = 0.95
    """Probability with which the lower bound holds, in (0, 1)."""
    client: str | None = None
    """The client whose records the canaries join (``null``: the first client)."""

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def __post_init__(self) -> None:
        require(self.method in AUDIT_METHODS, "audit.method", self.method, f"choose one of {AUDIT_METHODS}")
        require(self.canary in AUDIT_CANARIES, "audit.canary", self.canary, f"choose one of {AUDIT_CANARIES}")
        require(
            self.canary_norm > 0 and math.isfinite(self.canary_norm),
            "audit.canary_norm",
            self.canary_norm,
            "must be > 0 and finite",
        )
        require(self.canaries >= 2, "audit.canaries", self.canaries, "must be >= 2")
        require(self.canary_scale > 0, "audit.canary_scale", self.canary_scale, "must be > 0")
        require(
            2 <= self.guesses <= self.canaries and self.guesses % 2 == 0,
            "audit.guesses",
            self.guesses,
            f"must be even, in [2, audit.canaries={self.canaries}]",
        )
        require(0 < self.confidence < 1, "audit.confidence", self.confidence, "must be in (0, 1), e.g. 0.95")
