"""What ``python train.py`` runs: typed config in, a trained global model and a results file out.

The error contract: every refusal, whether Hydra's (unknown key, wrong type, unknown option), the config's, or
the library's once data, module or checkpoint are loaded, ends the run before training with one line
``error: <key or file>...: <rule and fix>`` on stderr and exit status 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fl_dp_lightning.audit.run import OneRunAudit, check_audit, describe_audit
from fl_dp_lightning.callbacks import FederatedLogger, FederatedProgressBar, RoundCheckpoint, logged_round
from fl_dp_lightning.config import Config, ConfigError, HardwareConfig, require
from fl_dp_lightning.dashboard import log_hparams
from fl_dp_lightning.data import FederatedDataModule
from fl_dp_lightning.data.features import SCATTERNET_SHAPE
from fl_dp_lightning.strategy import FederatedDPStrategy
from fl_dp_lightning.strategy.distributed import DistributedFederatedDPStrategy

CONF_DIR = Path(__file__).resolve().parent / "conf"
LAUNCHER_VARIABLES = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS")
"""Environment variables that torchrun or SLURM set for every process they launch."""


def unknown_keys(cfg: DictConfig, schema: type = Config, prefix: str = "") -> list[str]:
    """Keys of ``cfg`` that the typed schema does not have (``+key=value`` typos); ``model`` is free-form."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    found = []
    for key in cfg:
        field = fields.get(key)
        if field is None:
            found.append(f"{prefix}{key}" + did_you_mean(str(key), fields, prefix))
        elif dataclasses.is_dataclass(field.default_factory) and isinstance(cfg[key], DictConfig):
            found += unknown_keys(cfg[key], field.default_factory, f"{prefix}{key}.")
    return found


def did_you_mean(key: str, known: Any, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def to_config(cfg: DictConfig | Config) -> Config:
    """Converts a composed Hydra config to the typed :class:`Config`, validating every group."""
    if isinstance(cfg, Config):
        return cfg
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError(f"{', '.join(unknown)}: unknown key; remove it (see the README's configuration table)")
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
    """Refuses hardware this machine lacks, or nodes without a launcher, naming the key and the fix."""
    require(
        hardware.num_nodes == 1 or any(v in os.environ for v in LAUNCHER_VARIABLES),
        "hardware.num_nodes",
        hardware.num_nodes,
        "several nodes need a launcher on each node: start with torchrun --nnodes N ... train.py or srun python "
        "train.py (see the README), or set hardware.num_nodes=1",
    )
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
    """Wall-clock seconds of each round (its training plus the end-of-round validation), and per round a
    ``history`` row: the round (1-based), its seconds, the metrics Lightning holds then (under DP only released
    ones: training-stage logs are withheld before they reach it) and the largest epsilon."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.history: list[dict[str, float | int | None]] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        epsilons = [e for e in getattr(trainer.strategy, "epsilons", dict)().values() if e is not None]
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        row = {"round": trainer.current_epoch + 1, "seconds": self.seconds[-1], **metrics}
        self.history.append(row | {"epsilon_max": max(epsilons, default=None)})


def build_model(conf: Config) -> pl.LightningModule:
    """The configured LightningModule, refused in one line where it cannot be built or cannot read the data's
    features (checked on one zero input, before any data loads or features are computed)."""
    from hydra.errors import InstantiationException

    target = conf.model.get("_target_")
    try:
        module = instantiate(conf.model)
    except InstantiationException as err:
        if any(isinstance(e, ConfigError) for e in causes(err)):
            raise
        reason = " ".join(str(err).split()).split(", set env var HYDRA_FULL_ERROR")[0]
        raise ConfigError(
            f"model._target_={target!r}: {reason}; name an importable class (e.g. fl_dp_lightning.models.LitClassifier)"
        ) from err
    if not isinstance(module, pl.LightningModule):
        raise ConfigError(f"model._target_={target!r}: must build a LightningModule")
    if conf.data.features == "scatternet":
        try:
            with torch.no_grad():
                module.eval()(torch.zeros(1, *SCATTERNET_SHAPE))
        except Exception as err:  # the model reads pixels
            raise ConfigError(
                f"data.features=scatternet: the model cannot read {'x'.join(map(str, SCATTERNET_SHAPE))} ScatterNet "
                f"features ({type(err).__name__}); use model=scatternet, or a model whose input matches"
            ) from err
        module.train()
    return module


def build(conf: Config, run_dir: Path) -> tuple[pl.Trainer, pl.LightningModule, FederatedDataModule]:
    """The Trainer, module and data module of a run; nothing trains yet."""
    check_hardware(conf.hardware)
    pl.seed_everything(conf.trainer.seed, workers=True, verbose=False)
    datamodule = FederatedDataModule.from_config(
        conf.data, conf.client, batch_size=conf.trainer.batch_size, seed=conf.trainer.seed
    )
    module = build_model(conf)
    federated = dict(
        privacy=conf.privacy,
        server=conf.server,
        engine=conf.engine,
        user_privacy=conf.user_privacy,
        secure_aggregation=conf.secure_aggregation,
        local_epochs=conf.trainer.local_epochs,
        client_fraction=conf.client.round_fraction(),
        client_sampling=conf.client.sampling,
        proximal_mu=conf.client.proximal_mu,
        client_overrides=conf.client.overrides,
        on_client_failure=conf.client.on_failure,
        client_time_limit=conf.client.time_limit_s,
        syft=conf.client.syft if conf.client.runtime == "syft" else None,
        seed=conf.trainer.seed,
    )
    multi = conf.hardware.devices * conf.hardware.num_nodes > 1
    strategy = DistributedFederatedDPStrategy(**federated) if multi else FederatedDPStrategy(**federated)
    callbacks: list[Callback] = [
        FederatedLogger(report_path=run_dir / "privacy_report.json"),
        RoundTimer(),
        # after every round (written atomically by the strategy), so a killed run resumes from its last round
        RoundCheckpoint(dirpath=run_dir / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False),
    ]
    progress_bar = conf.trainer.progress_bar and sys.stderr.isatty()  # no carriage-return noise in logs and pipes
    if progress_bar:
        callbacks.append(FederatedProgressBar())
    if conf.audit.enabled:
        callbacks.append(OneRunAudit(conf.audit))
    trainer = pl.Trainer(
        accelerator=conf.hardware.accelerator,
        devices=conf.hardware.devices,
        num_nodes=conf.hardware.num_nodes,
        strategy=strategy,
        max_epochs=conf.trainer.rounds,
        logger=TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False),
        callbacks=callbacks,
        # a vectorized round is one Lightning step
        log_every_n_steps=1 if conf.engine.name == "vectorized" else conf.trainer.log_every_n_steps,
        enable_progress_bar=progress_bar,
        num_sanity_val_steps=0,
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,  # every process validates on the whole shared test set
    )
    return trainer, module, datamodule


def run_hparams(conf: Config, data_origin: str | None) -> dict[str, Any]:
    """Every config value as ``group.key`` (lists as text), and the data actually used, for TensorBoard's HPARAMS."""
    flat = {"data.origin": data_origin or ""}
    for group, values in dataclasses.asdict(conf).items():
        for key, value in values.items() if isinstance(values, dict) else [("", values)]:
            flat[f"{group}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def log_lightning_to_files() -> None:
    """Sends Lightning's log lines (the per-round lines, the privacy report) to the run's log file too.

    Lightning's logger does not propagate to the root logger, where Hydra's file handler (``train.log``) sits.
    """
    import logging

    lightning_log = logging.getLogger("lightning.pytorch")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler not in lightning_log.handlers:
            lightning_log.addHandler(handler)


def run(cfg: DictConfig | Config, run_dir: str | Path) -> dict[str, Any]:
    """Trains, tests and writes ``results.json`` into ``run_dir``; returns the results."""
    conf = to_config(cfg)
    run_dir = Path(run_dir)
    log_lightning_to_files()
    check_audit(conf)
    trainer, module, datamodule = build(conf, run_dir)
    datamodule.setup("fit")  # the data origin, for the hyperparameters
    log_hparams(trainer.logger, run_hparams(conf, datamodule.data_origin))  # its metric columns fill at the end
    rank_zero_info(
        f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}, then open "
        "http://localhost:6006/#custom_scalars&_smoothingWeight=0 (epsilon per client, unsmoothed)"
    )
    trainer.fit(module, datamodule, ckpt_path=conf.trainer.ckpt_path)
    strategy: FederatedDPStrategy = trainer.strategy
    if strategy.rounds_trained and strategy.faults and not strategy.updates_added:
        raise ConfigError(
            f"no client finished any of the {strategy.rounds_trained} round(s): every client failed (the faults are "
            f"in {run_dir / 'privacy_report.json'}), so the global model is untrained; fix the failing clients' data "
            "or module (or raise client.time_limit_s)"
        )
    test_metrics = trainer.test(module, datamodule, verbose=False)[0]
    timer = next(cb for cb in trainer.callbacks if isinstance(cb, RoundTimer))
    epsilons = strategy.epsilons()
    final = {"final/test_acc": float(test_metrics.get("test/acc", float("nan")))}
    released = [eps for eps in epsilons.values() if eps is not None]
    if released:
        final["final/epsilon_max"] = max(released)
    trainer.logger.log_metrics(final, step=logged_round(trainer))  # the round axis, at the last round
    trainer.logger.experiment.flush()  # on disk when run() returns, as the event files' readers expect
    results = {
        "data_origin": datamodule.data_origin,
        "rounds": strategy.rounds_trained,
        "test": {k: float(v) for k, v in test_metrics.items()},
        "epsilon": epsilons,
        "delta": conf.privacy.delta if conf.privacy.enabled else None,
        "user_epsilon": None if strategy.user_level is None else strategy.user_level.epsilon(),
        "user_delta": conf.user_privacy.delta if conf.user_privacy.enabled else None,
        "seconds_per_round": timer.seconds,
        "history": timer.history,
    }
    audit = next((cb for cb in trainer.callbacks if isinstance(cb, OneRunAudit)), None)
    if audit is not None:
        if strategy.user_level is None:
            printed, delta = epsilons.get(audit.client), conf.privacy.delta
        else:
            printed, delta = results["user_epsilon"], conf.user_privacy.delta
        results["audit"] = audit.result(module, epsilon=printed, delta=delta)
        report_audit(results["audit"], trainer, run_dir / "privacy_report.json")
    if trainer.is_global_zero:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def report_audit(audit: dict[str, Any], trainer: pl.Trainer, report_path: Path) -> None:
    """The audit's line in the log, its numbers in TensorBoard (``audit/*``) and its entry in the privacy report."""
    rank_zero_info(describe_audit(audit))
    bound = {"audit/epsilon_lower_bound": audit["epsilon_lower_bound"]}
    if audit["epsilon"] is not None:
        bound["audit/epsilon"] = audit["epsilon"]
    trainer.logger.log_metrics(bound, step=logged_round(trainer))
    trainer.logger.finalize("success")  # written now: the run's last event file is closed after Lightning's
    if trainer.is_global_zero and report_path.exists():
        report = json.loads(report_path.read_text())
        report_path.write_text(json.dumps({**report, "audit": audit}, indent=2))


def main(cfg: DictConfig, run_dir: str | Path | None = None) -> None:
    """Hydra entry point: a refusal ends the run with one line naming the key or file, exit status 2."""
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    try:
        results = run(cfg, run_dir)
    except SIGTERMException:  # Lightning's, after the round's checkpoint; a SystemExit that would exit 0
        stopped(Path(run_dir), "SIGTERM", 128 + signal.SIGTERM)
    except SystemExit as err:  # Lightning turns Ctrl-C into sys.exit(1) after its graceful shutdown
        if isinstance(err.__context__, KeyboardInterrupt):
            stopped(Path(run_dir), "SIGINT", 128 + signal.SIGINT)
        raise
    except Exception as err:
        if not any(isinstance(e, ConfigError) for e in causes(err)):
            raise
        fail(err)  # also a refusal raised inside Hydra's instantiate (a model's own check)
    if rank_zero_only.rank == 0:
        print(json.dumps(results, indent=2))


def resume_command(run_dir: Path) -> str:
    """The command that resumes this run from its last checkpoint, in its own folder: its overrides, the folder and
    ``trainer.ckpt_path``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not started by Hydra (run(cfg, run_dir) from Python)
        overrides = sys.argv[1:]
    kept = [o for o in overrides if not o.startswith(("trainer.ckpt_path=", "hydra."))]
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    return " ".join(["python train.py", *kept, f"hydra.run.dir={run_dir}", f"trainer.ckpt_path={checkpoint}"])


def stopped(run_dir: Path, signal_name: str, status: int) -> NoReturn:
    """A run stopped by a signal: one line with the resume command (or that no round finished), a non-zero exit."""
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if checkpoint.exists():
        then = f"the last finished round's checkpoint is {checkpoint}; resume with: {resume_command(run_dir)}"
    else:
        then = "no round had finished, so there is no checkpoint; start the run again"
    print(f"error: stopped by {signal_name} before the end of training; {then}", file=sys.stderr)
    sys.exit(status)


def fail(err: BaseException) -> NoReturn:
    """Prints the one-line ``error: ...`` for ``err`` and exits with status 2."""
    print(f"error: {describe(err)}", file=sys.stderr)
    sys.exit(2)


def causes(err: BaseException) -> list[BaseException]:
    """``err`` and what caused it, outermost first."""
    chain, cause = [], err
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain


def describe(err: BaseException) -> str:
    """One line naming the key (or file) and what is wrong, from our errors, Hydra's and OmegaConf's."""
    from hydra.errors import MissingConfigException, OverrideParseException

    chain = causes(err)
    for e in chain:
        if isinstance(e, ConfigError):
            return " ".join(str(e).split())
        if isinstance(e, MissingConfigException) and e.missing_cfg_file:
            group, _, option = e.missing_cfg_file.rpartition("/")
            options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
            return f"{group}={option}: no such option; choose one of {options}"
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            rule = str(e).strip().splitlines()[0]
            if "not in" in rule:
                group, _, name = e.full_key.rpartition(".")
                schema = {f.name: f.default_factory for f in dataclasses.fields(Config)}.get(group, Config)
                known = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []
                hint = did_you_mean(name, known, f"{group}." if group else "")
                return f"{e.full_key}{hint}: unknown key; remove it (see the README's configuration table)"
            return f"{e.full_key}: {rule}"
        if isinstance(e, OverrideParseException):
            return f"cannot parse the override: {str(e).strip().splitlines()[0]}"
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def check_overrides(argv: list[str]) -> None:
    """Composes the config as ``train.py`` will, before Hydra starts, so a bad override gets the one-line error.

    Hydra's own messages span several lines and exit with 1; this runs first and exits with 2. Sweeps
    (``-m key=a,b``) are checked with their first value; Hydra's own flags (``--cfg``, ``--help``...) pass through.
    """
    flags = [a for a in argv if a.startswith("-")]
    if any(f not in ("-m", "--multirun") for f in flags):
        return
    try:
        compose_overrides([a for a in argv if not a.startswith("-")])
    except Exception as err:  # every composition error becomes one line (see describe)
        fail(err)


def compose_overrides(overrides: list[str]) -> Config:
    """The typed config that ``overrides`` give (the first value of each sweep); raises on any bad value."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from fl_dp_lightning.config import register_configs

    parsed = OverridesParser.create().parse_overrides(overrides)
    single = []
    for override in parsed:
        if override.key_or_group.startswith("hydra"):
            continue
        if override.is_sweep_override():
            single.append(f"{override.get_key_element()}={next(override.sweep_string_iterator())}")
        else:
            single.append(override.input_line)
        check_boolean(override)
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            conf = to_config(compose(config_name="config", overrides=single))
    finally:
        GlobalHydra.instance().clear()
    check_hardware(conf.hardware)
    return conf


def check_boolean(override: Any) -> None:
    """Refuses ``key=2`` for a boolean key (OmegaConf would read any non-zero number as true)."""
    group, _, name = override.key_or_group.rpartition(".")
    schema = {f.name: f for f in dataclasses.fields(Config)}.get(group)
    if schema is None or not dataclasses.is_dataclass(schema.default_factory):
        return
    field = {f.name: f for f in dataclasses.fields(schema.default_factory)}.get(name)
    value = override.value() if not override.is_sweep_override() else None
    if field is not None and field.type in ("bool", bool) and value is not None and not isinstance(value, bool):
        raise ConfigError(f"{override.key_or_group}={value!r}: must be true or false")
