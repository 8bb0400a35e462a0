"""The audit as ``train.py`` runs it: canaries into one client's records before training, after training a
lower bound from the released global model, reported beside that client's printed epsilon."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fl_dp_lightning.audit.bounds import one_run_lower_bound
from fl_dp_lightning.audit.canaries import Canaries, canary_scores, draw_canaries, guess, with_canaries
from fl_dp_lightning.config import AuditConfig, Config, ConfigError, require

NOT_FOR_RELEASE = (
    "the audited run trained on the audit's canaries: its model is evidence about the mechanism, not the "
    "production model, and must not be released"
)


def check_audit(conf: Config) -> None:
    """Refuses, before training, the settings an audit run cannot measure."""
    if not conf.audit.enabled:
        return
    require(
        not conf.user_privacy.enabled,
        "audit.method",
        conf.audit.method,
        "audits record-level DP-SGD; user-level DP needs canary clients, which are not built: set audit=none",
    )
    require(
        conf.hardware.devices * conf.hardware.num_nodes == 1,
        "audit.method",
        conf.audit.method,
        "each process would draw its own canaries: audit in one process (hardware=cpu or hardware=gpu)",
    )
    require(
        conf.trainer.ckpt_path is None,
        "audit.method",
        conf.audit.method,
        "an audit's canaries are drawn afresh in each run, so it cannot resume: drop trainer.ckpt_path",
    )


def add_canaries(audit: AuditConfig, datamodule: Any, seed: int | None = None) -> tuple[str, Canaries]:
    """Adds the canaries to the audited client's training records (``datamodule`` set up); returns the client and
    the canaries, whose coins stay secret to the auditor. ``seed`` fixes the coins (tests only)."""
    client = audit.client or next(iter(datamodule.client_datasets))
    if client not in datamodule.client_datasets:
        raise ConfigError(f"audit.client={client!r}: no such client; choose one of {list(datamodule.client_datasets)}")
    if datamodule.num_classes is None:
        raise ConfigError(f"audit.method={audit.method}: the canaries need integer class labels; set audit=none")
    records, public = datamodule.client_datasets[client], datamodule.test_set
    # scaled like the shared public set: no statistic of the client's own records enters the audit's output
    like = torch.stack([public[i][0] for i in range(min(len(public), 256))])
    canaries = draw_canaries(audit.canaries, like, datamodule.num_classes, audit.canary_scale, seed=seed)
    datamodule.client_datasets[client] = with_canaries(records, canaries)
    return client, canaries


def audit_model(
    audit: AuditConfig, canaries: Canaries, model: nn.Module, *, client: str, epsilon: float | None, delta: float
) -> dict[str, Any]:
    """The one-run audit of the released ``model``: its guesses, right guesses and lower bound at ``delta``,
    beside ``client``'s printed ``epsilon`` (``None``: no DP)."""
    slots, guesses = guess(canary_scores(model, canaries), audit.guesses)
    correct = int((canaries.coins[slots] == guesses).sum())
    bound = one_run_lower_bound(len(canaries), audit.guesses, correct, delta, audit.confidence)
    return {
        "method": audit.method,
        "client": client,
        "epsilon_lower_bound": bound,
        "epsilon": epsilon,
        "delta": delta,
        "confidence": audit.confidence,
        "canaries": len(canaries),
        "guesses": audit.guesses,
        "correct_guesses": correct,
        "computed_from": "the released global model and the audit's own canaries and coins (scaled like the "
        "public test set); no client record is read",
        "note": NOT_FOR_RELEASE,
    }


def describe_audit(result: dict[str, Any]) -> str:
    """One line for the log."""
    printed = "no DP" if result["epsilon"] is None else f"{result['epsilon']:.3g}"
    return (
        f"audit ({result['method']}): empirical epsilon lower bound {result['epsilon_lower_bound']:.3g} for client "
        f"{result['client']!r} at {result['confidence']:.0%} confidence ({result['correct_guesses']} of "
        f"{result['guesses']} guesses right about {result['canaries']} canaries), beside its printed epsilon "
        f"{printed}; {NOT_FOR_RELEASE}"
    )
