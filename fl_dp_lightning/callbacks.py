"""Callbacks that show a federated run: per-client metrics and epsilon each round, and the progress bar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from fl_dp_lightning.privacy.report import format_report, privacy_report


def federated_strategy(trainer: pl.Trainer) -> Any:
    """The trainer's federated strategy; a clear error when another strategy is in use."""
    from fl_dp_lightning.strategy.federated_dp import FederatedRounds

    if not isinstance(trainer.strategy, FederatedRounds):
        raise TypeError(f"this callback needs Trainer(strategy=FederatedDPStrategy(...)), got {trainer.strategy}")
    return trainer.strategy


class FederatedLogger(Callback):
    """After each round, logs and prints every client's training metrics and epsilon.

    Logged to every attached Lightning logger with the round (0-based) as the step:
    ``train/<metric>/<client>`` for the clients that trained, ``privacy/epsilon/<client>`` for every
    client and ``privacy/epsilon_max``; the latter also reaches the progress bar and ``callback_metrics``
    (so ``ModelCheckpoint``/``EarlyStopping`` can monitor it). Epsilons come from each client's accountant.

    At the end of training it writes the privacy report (JSON, see :mod:`fl_dp_lightning.privacy.report`) to
    ``report_path`` (default: ``<Trainer.default_root_dir>/privacy_report.json``) and logs it as a table.

    Args:
        report_path: where to write the privacy report.
    """

    def __init__(self, report_path: str | Path | None = None) -> None:
        self.report_path = None if report_path is None else Path(report_path)

    def round_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        """The metrics of the round that just ended."""
        strategy = federated_strategy(trainer)
        metrics = {f"train/{k}/{r.client}": v for r in strategy.last_round for k, v in r.metrics.items()}
        if strategy.privacy.enabled:
            epsilons = strategy.epsilons()
            metrics.update({f"privacy/epsilon/{name}": eps for name, eps in epsilons.items()})
            metrics["privacy/epsilon_max"] = max(epsilons.values())
        return metrics

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = federated_strategy(trainer)
        metrics = self.round_metrics(trainer)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.current_epoch)
        if "privacy/epsilon_max" in metrics:
            pl_module.log("privacy/epsilon_max", metrics["privacy/epsilon_max"], prog_bar=True, logger=False)
        delta = strategy.privacy.delta
        for report in strategy.last_round:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in report.metrics.items())
            privacy = "no DP" if report.epsilon is None else f"ε = {report.epsilon:.2f} (δ = {delta:g})"
            rank_zero_info(
                f"[{report.client}] round {trainer.current_epoch + 1}/{trainer.max_epochs}  {shown}  {privacy}"
            )

    @rank_zero_only
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = federated_strategy(trainer)
        report = privacy_report(strategy.clients, strategy.privacy)
        path = self.report_path or Path(trainer.default_root_dir) / "privacy_report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        rank_zero_info(f"{format_report(report)}\nPrivacy report written to {path}")


class FederatedProgressBar(TQDMProgressBar):
    """Lightning's progress bar, with the round and the client now training."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        strategy = federated_strategy(trainer)
        metrics["round"] = f"{trainer.current_epoch + 1}/{trainer.max_epochs}"
        if strategy.current_client is not None:
            metrics["client"] = strategy.current_client
        return metrics
