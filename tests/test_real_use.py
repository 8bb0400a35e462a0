"""Other people's Lightning projects and what a user sees: pytorch_lightning modules, LightningCLI, per-step
schedulers, normalisation fixes, checkpoint size, where reports go, what TensorBoard and train.log show."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import pytorch_lightning
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fl_dp_lightning import ConfigError, FederatedDataModule, FederatedDPStrategy, PrivacyConfig
from fl_dp_lightning.data import ClientDatasets
from fl_dp_lightning.data.datamodule import describe_sizes

from .conftest import make_trainer
from .strategy.test_strategy import BatchNormModule, UnawareModule


class WrittenForPytorchLightning(pytorch_lightning.LightningModule):
    """Imports the standalone package, as the UvA course and many older projects do."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.body(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("acc", (self.body(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_module_written_for_pytorch_lightning_trains_under_the_strategy(synthetic):
    from fl_dp_lightning.pytorch_lightning import FederatedDPStrategy as PLStrategy

    x, y = synthetic.train.tensors
    clients = ClientDatasets({"a": TensorDataset(x[:600], y[:600]), "b": TensorDataset(x[600:], y[600:])}, 32)
    strategy = PLStrategy(privacy=PrivacyConfig())
    trainer = pytorch_lightning.Trainer(
        strategy=strategy,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(Path(pl.Trainer().default_root_dir)),
    )
    module = WrittenForPytorchLightning()
    trainer.fit(module, train_dataloaders=clients, val_dataloaders=DataLoader(synthetic.test, batch_size=100))
    assert trainer.callback_metrics["acc"] > 0.5
    assert all(len(c.accountant.history) == 1 for c in strategy.clients.values())


class WarmupPerStep(UnawareModule):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, end_factor=1.0, total_iters=50)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def test_every_client_of_a_round_starts_at_the_same_point_of_a_per_step_schedule(synthetic):
    first_lr: dict[tuple[int, str], float] = {}

    class Record(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            key = (trainer.current_epoch, trainer.strategy.current_client)
            first_lr.setdefault(key, optimizer.param_groups[0]["lr"])

    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=["a", "b"], batch_size=40)
    make_trainer(FederatedDPStrategy(privacy=PrivacyConfig()), 2, callbacks=[Record()]).fit(WarmupPerStep(), datamodule)
    for round_idx in range(2):
        assert first_lr[(round_idx, "a")] == first_lr[(round_idx, "b")]
    assert first_lr[(0, "a")] == pytest.approx(0.001) and first_lr[(1, "a")] > first_lr[(0, "a")]  # it advances


@pytest.mark.parametrize(
    ("trainer_kwargs", "message"),
    [
        ({"fast_dev_run": True}, "fast_dev_run=True: it stops in the middle of a round"),
        ({"max_steps": 5}, "max_steps=5"),
    ],
)
def test_settings_that_stop_mid_round_are_refused(synthetic, trainer_kwargs, message):
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=2, batch_size=32)
    kwargs = {"rounds": 1, **trainer_kwargs}
    with pytest.raises(ConfigError, match=message):
        make_trainer(FederatedDPStrategy(), **kwargs).fit(UnawareModule(), datamodule)


class MLPWithBatchNorm(UnawareModule):
    """The lightning-hydra-template's SimpleDenseNet shape: Linear, BatchNorm1d, ReLU, twice."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 64),
            nn.BatchNorm1d(64),
            nn.ReLU(),
            nn.Linear(64, 48),
            nn.BatchNorm1d(48),
            nn.ReLU(),
            nn.Linear(48, 10),
        )


def test_batchnorm_is_refused_naming_each_layer_once_in_one_short_line(synthetic):
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=2, batch_size=32)
    with pytest.raises(ConfigError) as refused:
        make_trainer(FederatedDPStrategy(), 1).fit(MLPWithBatchNorm(), datamodule)
    message = str(refused.value)
    assert "\n" not in message and len(message) < 500, message
    assert message.count("body.2 (BatchNorm1d)") == 1 and message.count("body.5 (BatchNorm1d)") == 1
    assert message.count("BatchNorm cannot support training with differential privacy") == 1
    assert "privacy.fix_modules=true" in message


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", [nn.GroupNorm(1, 64), nn.GroupNorm(1, 48)]),
        ("groupnorm", [nn.GroupNorm(32, 64), nn.GroupNorm(24, 48)]),
        ("layernorm", [nn.GroupNorm(1, 64), nn.GroupNorm(1, 48)]),
        ("identity", [nn.Identity(), nn.Identity()]),
    ],
)
def test_fix_modules_offers_a_choice_of_normalisation_and_warns_that_the_model_changed(synthetic, choice, expected):
    # seeded: GroupNorm over groups of two features is ill-conditioned where the two are close, and the probe's
    # comparison of per-example gradients (batch against alone) then depends on the initial weights
    pl.seed_everything(0)
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=2, batch_size=32)
    module = MLPWithBatchNorm()
    privacy = PrivacyConfig(fix_modules=True, fix_norm=choice)
    with pytest.warns(UserWarning, match="privacy.fix_modules changed the model: .*body.2"):
        make_trainer(FederatedDPStrategy(privacy=privacy), 1, limit_val_batches=0).fit(module, datamodule)
    assert [repr(module.body[i]) for i in (2, 5)] == [repr(e) for e in expected]


def test_batchnorm2d_auto_becomes_groupnorm_with_a_divisor_group_count(synthetic):
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=2, batch_size=32)
    module = BatchNormModule()  # Conv2d(1, 4) + BatchNorm2d(4)
    with pytest.warns(UserWarning, match="changed the model"):
        make_trainer(FederatedDPStrategy(privacy=PrivacyConfig(fix_modules=True)), 1, limit_val_batches=0).fit(
            module, datamodule
        )
    assert repr(module.body[1]) == repr(nn.GroupNorm(4, 4))


class NetInHparams(UnawareModule):
    """Stores its network in hparams, as the lightning-hydra-template does (pickled into every checkpoint)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.body = net


@pytest.mark.filterwarnings("ignore:Attribute 'net' is an instance of `nn.Module`")
def test_a_dp_checkpoint_is_within_10_percent_of_the_no_dp_checkpoint(synthetic, tmp_path):
    sizes = {}
    for enabled in (True, False):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 10))
        datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=2, batch_size=64)
        trainer = make_trainer(FederatedDPStrategy(privacy=PrivacyConfig(enabled=enabled)), 1, limit_val_batches=0)
        trainer.fit(NetInHparams(net), datamodule)
        path = tmp_path / f"{enabled}.ckpt"
        trainer.save_checkpoint(path)
        sizes[enabled] = path.stat().st_size
    assert sizes[True] <= 1.1 * sizes[False], sizes
    for enabled in (True, False):  # the network really is in both (the template's situation)
        assert isinstance(
            torch.load(tmp_path / f"{enabled}.ckpt", weights_only=False)["hyper_parameters"]["net"], nn.Module
        )


class MyDataModule(FederatedDataModule):
    """A project's own subclass, configured by LightningCLI from the command line."""

    def __init__(self, clients: int = 2, batch_size: int = 32, train_size: int = 600):
        super().__init__(source="synthetic", clients=clients, batch_size=batch_size, synthetic_sizes=(train_size, 200))


class CLIModule(UnawareModule):
    def predict_step(self, batch, batch_idx):
        return self.body(batch[0]).argmax(1)


def test_a_federated_data_module_subclass_works_under_lightning_cli_and_predicts(tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["my_project"])  # as if run from the command line with these args
    monkeypatch.setenv("JSONARGPARSE_DEPRECATION_WARNINGS", "off")  # Lightning's own use of jsonargparse
    cli = LightningCLI(
        CLIModule,
        MyDataModule,
        args=[
            "fit",
            "--seed_everything=0",
            "--trainer.strategy=federated_dp",
            "--trainer.max_epochs=1",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--data.clients=3",
        ],
        save_config_kwargs={"overwrite": True},
    )
    assert cli.datamodule.client_names == ["client_0", "client_1", "client_2"]
    assert set(cli.trainer.strategy.epsilons()) == {"client_0", "client_1", "client_2"}
    predictions = pl.Trainer(logger=False, enable_progress_bar=False).predict(cli.model, datamodule=cli.datamodule)
    assert sum(len(p) for p in predictions) == len(cli.datamodule.test_set) == 180  # 200 public, 20 for validation


def test_reports_of_two_runs_go_to_their_own_run_folders(synthetic, tmp_path):
    folders = []
    for _ in range(2):
        datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=2, batch_size=64)
        logger = TensorBoardLogger(save_dir=str(tmp_path), name="runs")
        trainer = make_trainer(FederatedDPStrategy(), 1, logger=logger, limit_val_batches=0)
        trainer.fit(UnawareModule(), datamodule)
        folders.append(Path(trainer.log_dir))
    assert folders[0] != folders[1] and all((f / "privacy_report.json").exists() for f in folders)
    no_logger = [make_trainer(FederatedDPStrategy(), 1, default_root_dir=str(tmp_path / "plain")) for _ in range(2)]
    for trainer in no_logger:
        datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=2, batch_size=64)
        trainer.fit(UnawareModule(), datamodule)
    assert sorted(p.name for p in (tmp_path / "plain").glob("privacy_report*.json")) == [
        "privacy_report-2.json",
        "privacy_report.json",
    ]


def test_large_client_counts_are_summarised_in_the_log():
    assert describe_sizes({"a": 3, "b": 5}) == "client examples {'a': 3, 'b': 5}"
    sizes = {f"c{i}": 10 + i for i in range(1000)}
    assert describe_sizes(sizes) == "1000 clients, examples per client min 10, median 510, max 1009"


@pytest.mark.parametrize("engine", ["opacus", "vectorized"])
def test_train_py_shows_every_setting_in_tensorboard_logs_rounds_to_train_log_and_counts_rounds_trained(
    tmp_path, engine
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.hparams import plugin_data_pb2

    from fl_dp_lightning.cli import run
    from fl_dp_lightning.dashboard import PRIVACY_FIRST

    from .config.test_config import composed

    file_log = logging.FileHandler(tmp_path / "train.log")  # what Hydra attaches to the root logger
    logging.getLogger().addHandler(file_log)
    try:
        conf = composed(
            "data=synthetic",
            "trainer.rounds=4",
            "trainer.batch_size=100",
            "privacy.max_epsilon=4",
            "trainer.progress_bar=false",
            f"engine={engine}",
        )
        results = run(conf, tmp_path)
    finally:
        logging.getLogger().removeHandler(file_log)
        logging.getLogger("lightning.pytorch").removeHandler(file_log)
    assert (
        results["rounds"] == json.loads((tmp_path / "results.json").read_text())["rounds"] == 2
    )  # the budget (4 > 3.47 after 2 rounds, 4.24 after 3) stopped it
    log = (tmp_path / "train.log").read_text()
    assert "[alice] round 1/4" in log and "Privacy report (accountant pld, replace-one adjacency)" in log
    assert f"tensorboard --logdir {tmp_path / 'tensorboard'}, then open http://localhost:6006/#custom_scalars" in log

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "hp_metric" not in scalars
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in scalars}
    values = [e.value for tag in scalars for e in events.Scalars(tag)]
    assert all(math.isfinite(v) for v in values)  # no placeholder points
    # every per-round scalar on the round axis (0-based), the final numbers once at the last round
    assert steps["val/acc"] == steps["val/loss"] == [0, 1]  # the third round trained no one and stopped the run
    assert steps["privacy/epsilon/alice"] == steps["privacy/epsilon/bob"] == steps["privacy/epsilon_max"] == [0, 1, 2]
    assert steps["final/test_acc"] == steps["final/epsilon_max"] == [2] and len(steps["test/acc"]) == 1
    assert "step" not in results["test"]  # the round axis stays out of what trainer.test returns
    assert steps.get("epoch", [0]) == steps["test/acc"]  # Lightning's own epoch scalar, beside the test metrics only
    assert set(steps) <= {
        "val/acc",
        "val/loss",
        "test/acc",
        "test/loss",
        "final/test_acc",
        "final/epsilon_max",
        "epoch",
    } | {f"privacy/epsilon{s}" for s in ("/alice", "/bob", "_max")}
    # each round's values unsmoothed, as text: the logged epsilon at full precision
    text = [t.tensor_proto.string_val[0].decode() for t in events.Tensors("round/text_summary")]
    epsilon = events.Scalars("privacy/epsilon/alice")[-1].value
    assert len(text) == 3 and f"| privacy/epsilon/alice | {epsilon:.6g} |" in text[-1]
    assert epsilon == pytest.approx(results["epsilon"]["alice"], rel=1e-6)
    plugin = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/experiment"]).experiment
    # TensorBoard shows columns by name (the first five ticked): the privacy settings sort first
    shown = [info.display_name for info in sorted(experiment.hparam_infos, key=lambda info: info.name)][:5]
    assert sorted(shown) == sorted(PRIVACY_FIRST) and PRIVACY_FIRST[:3] == (
        "privacy.noise_multiplier",
        "privacy.max_grad_norm",
        "privacy.delta",
    )
    by_name = {info.name: info.display_name for info in experiment.hparam_infos}
    session = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/session_start_info"]).session_start_info
    hparams = {by_name[k]: v.ListFields()[0][1] for k, v in session.hparams.items()}
    assert hparams["privacy.noise_multiplier"] == 1.2 and hparams["privacy.max_grad_norm"] == 1.0
    assert hparams["privacy.delta"] == 1e-5 and hparams["privacy.accountant"] == "pld"
    assert hparams["client.count"] == 2 and hparams["client.partition"] == "iid" and hparams["trainer.rounds"] == 4
    assert hparams["data.origin"].startswith("synthetic")
    assert {m.name.tag for m in experiment.metric_infos} == {"final/test_acc", "final/epsilon_max"}
    layout = layout_pb2.Layout.FromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    assert layout.category[0].title == "Privacy" and "privacy/epsilon/.*" in str(layout.category[0])
    assert "user_epsilon" not in str(layout)  # no empty user-level chart in a run without user-level DP


def test_the_privacy_table_in_the_log_summarises_many_clients():
    from fl_dp_lightning.privacy.report import SHOWN_CLIENTS, format_report

    row = {"delta": 1e-5, "noise_multiplier": 1.2, "max_grad_norm": 1.0, "sample_rate": 0.5, "steps": 2}
    clients = {f"c{i}": {**row, "epsilon": 1 + i / 1000, "num_examples": 60} for i in range(1000)}
    report = {"enabled": True, "accountant": "pld", "adjacency": "replace-one", "guarantee": "G", "released": [],
              "not_covered": [], "clients": clients}  # fmt: skip
    lines = format_report(report).splitlines()
    assert len(lines) == 2 + SHOWN_CLIENTS + 2
    more = 1000 - SHOWN_CLIENTS
    assert lines[-2] == f"... and {more} more clients; epsilon min 1.0000, max 1.9990 (every client in the JSON report)"


def test_a_pytorch_lightning_trainer_takes_the_federated_data_module(synthetic):
    from fl_dp_lightning.pytorch_lightning import FederatedDataModule as PLDataModule
    from fl_dp_lightning.pytorch_lightning import FederatedDPStrategy as PLStrategy

    datamodule = PLDataModule(train=synthetic.train, test=synthetic.test, clients=["a", "b"], batch_size=32)
    assert isinstance(datamodule, pytorch_lightning.LightningDataModule)
    trainer = pytorch_lightning.Trainer(
        strategy=PLStrategy(privacy=PrivacyConfig()),
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(Path(pl.Trainer().default_root_dir)),
    )
    trainer.fit(WrittenForPytorchLightning(), datamodule)
    assert trainer.callback_metrics["acc"] > 0.5 and trainer.current_epoch == 2


class WithSGD(UnawareModule):
    def forward(self, x):  # the vectorized engine calls the module's forward
        return self.body(x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("engine", "module", "name"), [("opacus", UnawareModule, "Adam"), ("vectorized", WithSGD, "SGD")]
)
def test_learning_rate_monitor_names_the_users_optimizer(synthetic, engine, module, name):
    from lightning.pytorch.callbacks import LearningRateMonitor

    from .conftest import RecordingLogger

    logger = RecordingLogger()
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=2, batch_size=40)
    strategy = FederatedDPStrategy(privacy=PrivacyConfig(), engine=engine)
    trainer = make_trainer(strategy, 1, logger=logger, callbacks=[LearningRateMonitor(logging_interval="epoch")])
    trainer.fit(module(), datamodule)  # no scheduler: the monitor names the optimizer by its class
    assert logger.series(f"lr-{name}") and not any(k.startswith("lr-DP") for _, m in logger.records for k in m)


@pytest.mark.parametrize("engine", ["opacus", "vectorized"])
def test_nothing_the_strategy_installs_outlives_the_fit_a_module_and_its_checkpoint_pickle(synthetic, tmp_path, engine):
    import pickle

    module = WithSGD()
    before = set(vars(module))
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=2, batch_size=40)
    trainer = make_trainer(FederatedDPStrategy(privacy=PrivacyConfig(), engine=engine), 1)
    trainer.fit(module, datamodule)
    assert set(vars(module)) - before <= {"_trainer", "_hparams"} and "log" not in vars(module)  # Lightning's own
    pickle.loads(pickle.dumps(module))
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    assert torch.load(tmp_path / "after.ckpt", weights_only=False)["state_dict"].keys() == module.state_dict().keys()


def test_the_user_level_chart_is_laid_out_only_for_runs_with_user_level_dp():
    from fl_dp_lightning.dashboard import tensorboard_layout

    assert "user-level epsilon" in tensorboard_layout(user_level=True)["Privacy"]
    assert list(tensorboard_layout(user_level=False)["Privacy"]) == ["epsilon per client", "largest epsilon"]


def test_validation_goes_on_the_round_axis_while_a_users_checkpoints_keep_counting_global_steps(synthetic, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from .conftest import RecordingLogger

    logger = RecordingLogger()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)  # Lightning's default names: epoch=E-step=S
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=2, batch_size=40)
    strategy = FederatedDPStrategy(privacy=PrivacyConfig())
    trainer = make_trainer(strategy, 2, logger=logger, callbacks=[checkpoint], enable_checkpointing=True)
    trainer.fit(UnawareModule(), datamodule)
    assert list(logger.series("my_acc")) == [0, 1]  # the module's validation log, per round
    assert trainer.global_step > 2 and "step" not in trainer.callback_metrics
    assert sorted(p.name for p in tmp_path.glob("*.ckpt"))[-1] == f"epoch=1-step={trainer.global_step}.ckpt"
