"""What ``python train.py`` runs: typed config in, a trained global model and a results file out."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from fl_dp_lightning.callbacks import FederatedLogger, FederatedProgressBar
from fl_dp_lightning.config import Config, ConfigError, HardwareConfig, require
from fl_dp_lightning.data import FederatedDataModule
from fl_dp_lightning.strategy import FederatedDPStrategy
from fl_dp_lightning.strategy.distributed import DistributedFederatedDPStrategy


def to_config(cfg: DictConfig | Config) -> Config:
    """Converts a composed Hydra config to the typed :class:`Config`, validating every group."""
    if isinstance(cfg, Config):
        return cfg
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as err:  # OmegaConf wraps errors raised in __post_init__
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise


def check_hardware(hardware: HardwareConfig) -> None:
    """Refuses hardware this machine lacks, naming the key and the fix."""
    if hardware.accelerator == "gpu":
        require(
            torch.cuda.is_available(),
            "hardware.accelerator",
            hardware.accelerator,
            "no CUDA GPU is visible on this machine; use hardware=cpu",
        )
        visible = torch.cuda.device_count()
        require(
            hardware.devices <= visible,
            "hardware.devices",
            hardware.devices,
            f"only {visible} GPU(s) visible; lower hardware.devices",
        )


class RoundTimer(Callback):
    """Wall-clock seconds of each round: its training plus the end-of-round validation."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def build(conf: Config, run_dir: Path) -> tuple[pl.Trainer, pl.LightningModule, FederatedDataModule]:
    """The Trainer, module and data module of a run; nothing trains yet."""
    check_hardware(conf.hardware)
    pl.seed_everything(conf.trainer.seed, workers=True, verbose=False)
    datamodule = FederatedDataModule.from_config(
        conf.data, conf.client, batch_size=conf.trainer.batch_size, seed=conf.trainer.seed
    )
    module = instantiate(conf.model)
    if not isinstance(module, pl.LightningModule):
        raise ConfigError(f"model._target_={conf.model.get('_target_')!r}: must build a LightningModule")
    federated = dict(
        privacy=conf.privacy,
        local_epochs=conf.trainer.local_epochs,
        client_fraction=conf.client.fraction,
        seed=conf.trainer.seed,
    )
    multi = conf.hardware.devices * conf.hardware.num_nodes > 1
    strategy = DistributedFederatedDPStrategy(**federated) if multi else FederatedDPStrategy(**federated)
    callbacks: list[Callback] = [
        FederatedLogger(),
        RoundTimer(),
        # after every round (written atomically by the strategy), so a killed run resumes from its last round
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False),
    ]
    if conf.trainer.progress_bar:
        callbacks.append(FederatedProgressBar())
    trainer = pl.Trainer(
        accelerator=conf.hardware.accelerator,
        devices=conf.hardware.devices,
        num_nodes=conf.hardware.num_nodes,
        strategy=strategy,
        max_epochs=conf.trainer.rounds,
        logger=TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""),
        callbacks=callbacks,
        log_every_n_steps=conf.trainer.log_every_n_steps,
        enable_progress_bar=conf.trainer.progress_bar,
        num_sanity_val_steps=0,
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,  # every process validates on the whole shared test set
    )
    return trainer, module, datamodule


def run(cfg: DictConfig | Config, run_dir: str | Path) -> dict[str, Any]:
    """Trains, tests and writes ``results.json`` into ``run_dir``; returns the results."""
    conf = to_config(cfg)
    run_dir = Path(run_dir)
    trainer, module, datamodule = build(conf, run_dir)
    trainer.fit(module, datamodule, ckpt_path=conf.trainer.ckpt_path)
    test_metrics = trainer.test(module, datamodule, verbose=False)[0]
    strategy: FederatedDPStrategy = trainer.strategy
    timer = next(cb for cb in trainer.callbacks if isinstance(cb, RoundTimer))
    results = {
        "data_origin": datamodule.data_origin,
        "rounds": trainer.current_epoch,
        "test": {k: float(v) for k, v in test_metrics.items()},
        "epsilon": strategy.epsilons(),
        "delta": conf.privacy.delta if conf.privacy.enabled else None,
        "seconds_per_round": timer.seconds,
    }
    if trainer.is_global_zero:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def main(cfg: DictConfig) -> None:
    """Hydra entry point: a bad config value ends the run with one line naming the key."""
    from hydra.core.hydra_config import HydraConfig

    try:
        results = run(cfg, HydraConfig.get().runtime.output_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if rank_zero_only.rank == 0:
        print(json.dumps(results, indent=2))
