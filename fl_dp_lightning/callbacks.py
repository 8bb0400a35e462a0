"""Callbacks that show a federated run: per-client metrics and epsilon each round, and the progress bar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from fl_dp_lightning.dashboard import counts_figure, round_table, tensorboard_layout
from fl_dp_lightning.data.class_counts import class_counts, counts_markdown
from fl_dp_lightning.privacy.report import SHOWN_CLIENTS, format_report, privacy_report
from fl_dp_lightning.update import FederatedRun


def federated_strategy(trainer: pl.Trainer) -> FederatedRun:
    """The trainer's federated strategy; a clear error when another strategy is in use."""
    if not isinstance(trainer.strategy, FederatedRun):
        raise TypeError(f"this callback needs Trainer(strategy=FederatedDPStrategy(...)), got {trainer.strategy}")
    return trainer.strategy


def run_folder(trainer: pl.Trainer) -> Path:
    """The first logger's run folder, else ``default_root_dir`` (``Trainer.log_dir`` without its broadcast: this
    runs on rank 0 alone)."""
    for logger in trainer.loggers:
        folder = getattr(logger, "log_dir", None) or logger.save_dir
        if folder:
            return Path(folder)
    return Path(trainer.default_root_dir)


def unused_path(path: Path) -> Path:
    """``path``, or ``<stem>-2<suffix>``, ``-3``... when a file is already there (runs never overwrite reports)."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def logged_round(trainer: pl.Trainer) -> int:
    """The round (0-based) that the global model now evaluated comes from: the one training in a fit, the last
    one trained after it."""
    fitting = trainer.state.fn == TrainerFn.FITTING
    return trainer.current_epoch if fitting else max(trainer.current_epoch - 1, 0)


def log_on_round_axis(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Puts the validation values Lightning is about to log in a fit on the round axis, the step of
    ``privacy/epsilon/*``, by logging Lightning's ``step`` key (Lightning logs on the global step, which counts
    every client's batches, otherwise). :meth:`FederatedLogger.on_validation_end` takes the key back out of
    ``callback_metrics`` before checkpoints name their files from it."""
    if not trainer.loggers or trainer.state.fn != TrainerFn.FITTING:
        return
    type(pl_module).log(pl_module, "step", float(trainer.current_epoch), on_step=False, on_epoch=True, logger=True)


def epsilon_text(strategy: Any, epsilon: float | None) -> str:
    """How a per-round line shows a client's epsilon, with what it is worth."""
    privacy = strategy.privacy
    if not privacy.enabled:
        return "no record-level DP" if strategy.user_level is not None else "no DP"
    if epsilon is None:
        return "ε not proven (privacy.poisson_sampling=false)"
    text = f"ε = {epsilon:.2f} (δ = {privacy.delta:g})"
    if privacy.accountant == "gdp":
        text += " approximation"
    if not strategy.guaranteed:
        text += " NOT GUARANTEED (see the privacy report)"
    return text


class FederatedLogger(Callback):
    """After each round, logs and prints every client's training metrics and epsilon.

    Logged to every attached Lightning logger with the round (0-based) as the step: ``privacy/epsilon/<client>``
    for every client and ``privacy/epsilon_max``; the latter also reaches the progress bar and
    ``callback_metrics`` (so ``ModelCheckpoint``/``EarlyStopping`` can monitor it). Epsilons come from each
    client's accountant. Per-client training metrics (``train/<metric>/<client>``) are computed from private
    records without noise, so they are logged only without privacy or under
    ``privacy.unsafe_release_training_metrics``.

    Validation logs in a fit go on the same round axis (Lightning would put them on its global step, which
    counts every client's batches). With TensorBoard, each round's values are also a table in
    the TEXT tab (``round``), unsmoothed.

    At the end of training it writes the privacy report (JSON, see :mod:`fl_dp_lightning.privacy.report`) to
    ``report_path`` (default: ``privacy_report.json`` in the logger's run folder, ``Trainer.log_dir``, else in
    ``default_root_dir``, numbered rather than overwriting another run's) and logs it as a table. With TensorBoard it
    adds a CUSTOM SCALARS layout: epsilon per client, validation accuracy and loss.

    Args:
        report_path: where to write the privacy report.
    """

    def __init__(self, report_path: str | Path | None = None) -> None:
        self.report_path = None if report_path is None else Path(report_path)

    def round_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        """The metrics of the round that just ended."""
        strategy = federated_strategy(trainer)
        metrics = {f"train/{k}/{r.client}": v for r in strategy.last_round for k, v in r.metrics.items()}
        for client, values in strategy.evaluate_clients().items():
            metrics.update({f"holdout/{k}/{client}": v for k, v in values.items()})
        if strategy.privacy.enabled and strategy.privacy.poisson_sampling:
            epsilons = strategy.epsilons()
            if not strategy.participation_withheld:  # else each value is the public every-round bound
                metrics.update({f"privacy/epsilon/{name}": eps for name, eps in epsilons.items()})
            metrics["privacy/epsilon_max"] = max(epsilons.values())
        if strategy.user_level is not None:
            metrics["privacy/user_epsilon"] = strategy.user_level.epsilon()
            metrics["privacy/user_clip"] = strategy.user_level.clip  # adaptive: moved by a noised count
        return metrics

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = federated_strategy(trainer)
        metrics = self.round_metrics(trainer)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.current_epoch)
            if isinstance(logger, TensorBoardLogger) and metrics and trainer.is_global_zero:
                logger.experiment.add_text("round", round_table(metrics), global_step=trainer.current_epoch)
        if "privacy/epsilon_max" in metrics:
            # past the strategy's guard on training-stage logging: epsilon is public, it comes from the accountant
            type(pl_module).log(
                pl_module, "privacy/epsilon_max", metrics["privacy/epsilon_max"], prog_bar=True, logger=False
            )
        if strategy.participation_withheld:
            bound = metrics.get("privacy/epsilon_max")
            rank_zero_info(
                f"round {trainer.current_epoch + 1}/{trainer.max_epochs}: which clients took part is withheld "
                "(user-level DP with client sampling)"
                + (
                    ""
                    if bound is None
                    else f"; record-level {epsilon_text(strategy, bound)} for a client in every round"
                )
            )
        epsilons = strategy.epsilons()
        for update in strategy.last_round if not strategy.participation_withheld else ():
            shown = "".join(f"  {k} {v:.4f}" for k, v in update.metrics.items()) + (
                "  DROPPED" if update.dropped else ""
            )
            rank_zero_info(
                f"[{update.client}] round {trainer.current_epoch + 1}/{trainer.max_epochs}{shown}  "
                f"{epsilon_text(strategy, epsilons[update.client])}"
            )
        if strategy.user_level is not None:
            rank_zero_info(
                f"round {trainer.current_epoch + 1}/{trainer.max_epochs}: user-level ε = "
                f"{metrics['privacy/user_epsilon']:.2f} (δ = {strategy.user_privacy.delta:g}), clip "
                f"{metrics['privacy/user_clip']:.4g}"
            )
        if strategy.withheld_logs and trainer.current_epoch == 0:
            rank_zero_info(
                f"Not released (computed from private records without noise): training-stage self.log "
                f"{sorted(strategy.withheld_logs)}; validation and test metrics are released. For debugging only: "
                "privacy.unsafe_release_training_metrics=true"
            )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_on_round_axis(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.callback_metrics.pop("step", None)  # logged; checkpoint names keep counting global steps

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                layout = tensorboard_layout(federated_strategy(trainer).user_level is not None)
                logger.experiment.add_custom_scalars(layout)
        if trainer.is_global_zero and federated_strategy(trainer).released_labels() is not None:
            self.log_class_counts(trainer)

    def log_class_counts(self, trainer: pl.Trainer) -> None:
        """Each client's records per class: a table (log, ``class_counts.md``, TensorBoard text) and a heat map
        (``class_counts.png``, TensorBoard image) in the run folder."""
        labels = federated_strategy(trainer).released_labels()
        if labels is None or None in labels.values() or any(y.is_floating_point() for y in labels.values()):
            rank_zero_info("Class counts not shown: they need every client's data as a TensorDataset of integer labels")
            return
        counts = class_counts(labels)
        table, figure = counts_markdown(list(labels), counts), counts_figure(list(labels), counts)
        folder = run_folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "class_counts.md").write_text(table + "\n")
        if figure is not None:
            figure.savefig(folder / "class_counts.png", dpi=100)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("partition/class_counts", table)
                if figure is not None:
                    logger.experiment.add_figure("partition/class_counts", figure, close=False)
        if figure is not None:
            import matplotlib.pyplot as plt

            plt.close(figure)
        shown = "\n".join(table.splitlines()[: SHOWN_CLIENTS + 2])
        more = f"\n... {len(labels) - SHOWN_CLIENTS} more" if len(labels) > SHOWN_CLIENTS else ""
        rank_zero_info(f"Records per class and client (all in {folder / 'class_counts.md'}):\n{shown}{more}")

    @rank_zero_only
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = federated_strategy(trainer)
        report = privacy_report(strategy)
        path = self.report_path or unused_path(run_folder(trainer) / "privacy_report.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        rank_zero_info(f"{format_report(report)}\nPrivacy report written to {path}")


class RoundCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that saves after every round, also after one in which no client trained.

    A round without any client (Poisson client sampling) makes no optimizer step, and Lightning's own callback
    skips a save when the global step has not moved since the last one; a run killed after such a round would
    resume from the round before it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._saved_epoch: int | None = None

    def _should_skip_saving_checkpoint(self, trainer: pl.Trainer) -> bool:
        skip = super()._should_skip_saving_checkpoint(trainer)
        if skip and self._last_global_step_saved == trainer.global_step and not trainer.fast_dev_run:
            fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
            return not fitting or self._saved_epoch == trainer.current_epoch
        return skip

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._saved_epoch = trainer.current_epoch


class FederatedProgressBar(TQDMProgressBar):
    """Lightning's progress bar, with the round and the client now training."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        strategy = federated_strategy(trainer)
        metrics["round"] = f"{trainer.current_epoch + 1}/{trainer.max_epochs}"
        if strategy.current_client is not None:
            metrics["client"] = strategy.current_client
        return metrics
