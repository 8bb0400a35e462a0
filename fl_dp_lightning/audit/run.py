"""The audit as a Lightning callback (``train.py``'s ``audit=``): canaries among one client's records before
training, after training a lower bound from the released global model, beside that client's printed epsilon."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from fl_dp_lightning.audit.bounds import one_run_lower_bound
from fl_dp_lightning.audit.canaries import Canaries, canary_scores, draw_canaries, guess, with_canaries
from fl_dp_lightning.audit.dirac import DiracCanaries, draw_dirac_canaries
from fl_dp_lightning.config import AuditConfig, Config, ConfigError, require

NOT_FOR_RELEASE = (
    "the audited run trained on the audit's canaries: its model is evidence about the mechanism, not the "
    "production model, and must not be released"
)


def check_audit(conf: Config) -> None:
    """Refuses, before training, the settings an audit run cannot measure."""
    if not conf.audit.enabled:
        return
    if conf.user_privacy.enabled:
        require(
            conf.audit.canary == "dirac",
            "audit.canary",
            conf.audit.canary,
            "user-level DP is audited with canary clients, whose updates are Dirac: set audit.canary=dirac",
        )
        require(
            conf.user_privacy.mechanism == "dp_fedavg",
            "audit.method",
            conf.audit.method,
            "canary clients are Poisson-sampled, not once an epoch as DP-FTRL's accounting assumes: audit "
            "user_privacy.mechanism=dp_fedavg",
        )
        require(
            not conf.secure_aggregation.enabled,
            "audit.method",
            conf.audit.method,
            "canary clients hold no secure-aggregation masks: audit user-level DP with secure_aggregation=none",
        )
    require(
        conf.hardware.devices * conf.hardware.num_nodes == 1,
        "audit.method",
        conf.audit.method,
        "each process would draw its own canaries: audit in one process (hardware=cpu or hardware=gpu)",
    )
    require(
        conf.audit.canary == "input" or conf.client.runtime != "syft",
        "audit.canary",
        conf.audit.canary,
        "Dirac canaries join the steps inside a client's engine, which a PySyft datasite runs out of reach: use "
        "audit.canary=input with client.runtime=syft",
    )
    require(
        conf.trainer.ckpt_path is None,
        "audit.method",
        conf.audit.method,
        "an audit's canaries are drawn afresh in each run, so it cannot resume: drop trainer.ckpt_path",
    )


def add_canaries(audit: AuditConfig, datamodule: Any, seed: int | None = None) -> tuple[str, Canaries]:
    """Adds input canaries to the audited client's training records (``datamodule`` set up); returns the client
    and the canaries, whose coins stay secret to the auditor. ``seed`` fixes the coins (tests only)."""
    client = audited_client(audit, list(datamodule.client_datasets))
    if datamodule.num_classes is None:
        raise ConfigError(
            f"audit.canary={audit.canary}: input canaries need integer class labels; set audit.canary=dirac"
        )
    records, public = datamodule.client_datasets[client], datamodule.public_set
    # scaled like the shared public set: no statistic of the client's own records enters the audit's output
    like = torch.stack([public[i][0] for i in range(min(len(public), 256))])
    canaries = draw_canaries(audit.canaries, like, datamodule.num_classes, audit.canary_scale, seed=seed)
    datamodule.client_datasets[client] = with_canaries(records, canaries)
    return client, canaries


def audited_client(audit: AuditConfig, clients: list[str]) -> str:
    """The client the canaries join: ``audit.client``, or the first."""
    client = audit.client or clients[0]
    if client not in clients:
        raise ConfigError(f"audit.client={client!r}: no such client; choose one of {clients}")
    return client


class OneRunAudit(Callback):
    """The one-run audit of one client's record-level DP (Steinke, Nasr and Jagielski 2023) around a
    ``Trainer(strategy=FederatedDPStrategy(...))`` fit: canaries join the client's records before its first
    step, and :meth:`result` reads the released global model after the fit.

    ``seed`` fixes the canaries and their coins (tests only: an auditor who knows the coins is no audit)."""

    def __init__(self, audit: AuditConfig, seed: int | None = None):
        self.audit, self.seed = audit, seed
        self.client: str | None = None
        """The audited client (known once the fit starts); ``None`` under user-level DP, audited with canary
        clients."""
        self.canaries: Canaries | DiracCanaries | None = None
        self._initial: dict[str, Tensor] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.audit.canary == "input" and self.canaries is None:
            self.client, self.canaries = add_canaries(self.audit, trainer.datamodule, self.seed)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.audit.canary != "dirac":
            return
        strategy = trainer.strategy
        if strategy.user_level is None:
            self.client = audited_client(self.audit, list(strategy.clients))
        trained = {name: p for name, p in pl_module.named_parameters() if p.requires_grad}
        shapes = {name: p.shape for name, p in trained.items()}
        total = sum(p.numel() for p in trained.values())
        if self.audit.canaries > total:
            raise ConfigError(
                f"audit.canaries={self.audit.canaries}: Dirac canaries need a coordinate each and the module trains "
                f"{total}; lower audit.canaries"
            )
        self.canaries = draw_dirac_canaries(self.audit.canaries, shapes, self.audit.canary_norm, seed=self.seed)
        self._initial = {name: p.detach().clone() for name, p in trained.items()}  # the public global start
        if strategy.user_level is None:
            strategy.clients[self.client].canaries = self.canaries
        else:  # each canary a client of its own, present when its coin is true (add/remove adjacency)
            strategy.canary_clients = self.canaries

    def scores(self, model: nn.Module) -> Tensor:
        """Each canary's score from the released ``model`` (high: coin true)."""
        if isinstance(self.canaries, DiracCanaries):
            return self.canaries.scores(self._initial, dict(model.named_parameters()))
        return canary_scores(model, self.canaries)

    def result(self, model: nn.Module, *, epsilon: float | None, delta: float) -> dict[str, Any]:
        """The audit of the released ``model``: its guesses, right guesses and lower bound at ``delta``, beside
        the audited client's printed ``epsilon`` (``None``: no DP)."""
        audit = self.audit
        slots, guesses = guess(self.scores(model), audit.guesses)
        correct = int((self.canaries.coins[slots] == guesses).sum())
        bound = one_run_lower_bound(len(self.canaries), audit.guesses, correct, delta, audit.confidence)
        dirac = audit.canary == "dirac"
        sources = "the released global model" + (" and the public initial one" if dirac else "")
        scale = "" if dirac else " (scaled like the public test set)"
        return {
            "method": audit.method,
            "canary": audit.canary,
            "client": self.client or "canary clients (user-level DP)",
            "epsilon_lower_bound": bound,
            "epsilon": epsilon,
            "delta": delta,
            "confidence": audit.confidence,
            "canaries": len(self.canaries),
            "guesses": audit.guesses,
            "correct_guesses": correct,
            "computed_from": f"{sources}, and the audit's own canaries and coins{scale}; no client record is read",
            "note": NOT_FOR_RELEASE,
        }


def describe_audit(result: dict[str, Any]) -> str:
    """One line for the log."""
    printed = "(none: no DP)" if result["epsilon"] is None else f"{result['epsilon']:.3g}"
    return (
        f"audit ({result['method']}): empirical epsilon lower bound {result['epsilon_lower_bound']:.3g} for client "
        f"{result['client']!r} at {result['confidence']:.0%} confidence ({result['correct_guesses']} of "
        f"{result['guesses']} guesses right about {result['canaries']} canaries), beside its printed epsilon "
        f"{printed}; {NOT_FOR_RELEASE}"
    )
