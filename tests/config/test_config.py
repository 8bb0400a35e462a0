"""train.py's Hydra configuration: every group composes; bad values stop before training, naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from fl_dp_lightning import DistributedFederatedDPStrategy, FederatedDPStrategy
from fl_dp_lightning.cli import build, to_config
from fl_dp_lightning.config import Config, ConfigError, register_configs

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
GROUPS = {
    group.name: sorted(p.stem for p in group.glob("*.yaml"))
    for group in CONF.iterdir()
    if group.is_dir() and group.name != "experiment"  # recipes, added with +experiment=
}


def composed(*overrides: str) -> Config:
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_config(compose(config_name="config", overrides=list(overrides)))


def test_the_default_config_is_the_seed_workload():
    conf = composed()
    assert (conf.data.name, conf.client.client_names(), conf.client.partition) == (
        "mnist",
        ["alice", "bob"],
        "iid",
    )
    p = conf.privacy
    assert (p.enabled, p.noise_multiplier, p.max_grad_norm, p.delta) == (True, 1.2, 1.0, 1e-5)
    assert (conf.trainer.rounds, conf.trainer.local_epochs, conf.trainer.batch_size) == (5, 1, 128)
    assert conf.model["lr"] == 0.1


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, options in GROUPS.items() for o in options])
def test_every_group_option_composes_and_builds(group, option, tmp_path, monkeypatch):
    assert set(GROUPS) == {
        "data",
        "client",
        "privacy",
        "server",
        "engine",
        "user_privacy",
        "secure_aggregation",
        "model",
        "hardware",
        "trainer",
        "audit",
    }
    conf = composed(f"{group}={option}")
    if conf.hardware.accelerator == "gpu":  # the GPU options are checked as if one GPU were present
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    if conf.hardware.accelerator == "gpu":
        if conf.hardware.devices > 1:  # more GPUs than the one pretended
            with pytest.raises(ConfigError, match="hardware.devices=2: only 1 GPU"):
                build(conf, tmp_path)
        return  # Trainer(accelerator="gpu") needs a real GPU; the checks above are what this machine can do
    trainer, module, datamodule = build(conf, tmp_path)
    expected = DistributedFederatedDPStrategy if conf.hardware.devices > 1 else FederatedDPStrategy
    assert type(trainer.strategy) is expected and trainer.num_devices == conf.hardware.devices
    assert trainer.strategy.privacy == conf.privacy and trainer.strategy.server == conf.server
    assert datamodule.client_names == conf.client.client_names()


def test_the_cross_device_recipe_is_user_level_dp_over_thousands_of_sampled_clients():
    conf = composed("+experiment=cross_device_fmnist")
    assert (conf.data.name, conf.data.features, conf.engine.name) == ("fashion_mnist", "scatternet", "vectorized")
    assert not conf.privacy.enabled and conf.user_privacy.enabled and conf.user_privacy.target_epsilon <= 3
    assert conf.client.count >= 3000 and conf.user_privacy.delta < 1 / conf.client.count
    assert (conf.client.sampling, conf.client.fraction, conf.client.partition) == ("poisson", 0.1, "dirichlet")
    assert conf.server.optimizer == "fedavgm" and conf.model["net"]["_target_"].endswith("scatternet_linear")
    assert composed("+experiment=cross_device_fmnist", "trainer.rounds=5").trainer.rounds == 5  # overridable


def test_overrides_from_the_issue_compose():
    conf = composed("privacy.noise_multiplier=0.8", "client.count=4", "trainer.rounds=3")
    assert conf.privacy.noise_multiplier == 0.8 and conf.trainer.rounds == 3
    assert conf.client.client_names() == ["alice", "bob", "client_2", "client_3"]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("privacy.noise_multiplier=-1", "privacy.noise_multiplier"),
        ("privacy.max_grad_norm=0", "privacy.max_grad_norm"),
        ("privacy.delta=1.5", "privacy.delta"),
        ("privacy.accountant=moments", "privacy.accountant"),
        ("client.count=0", "client.count"),
        ("client.fraction=0", "client.fraction"),
        ("data.name=cifar", "data.name"),
        ("trainer.rounds=0", "trainer.rounds"),
        ("trainer.batch_size=0", "trainer.batch_size"),
    ],
)
def test_bad_values_raise_an_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"^{key.replace('.', '[.]')}="):
        composed(override)


def test_a_gpu_asked_for_where_none_is_stops_before_anything_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for option in ("gpu", "multi_gpu"):
        with pytest.raises(ConfigError, match="hardware.accelerator='gpu': no CUDA GPU"):
            build(composed(f"hardware={option}"), tmp_path)


def test_an_unknown_config_group_option_is_refused():
    with pytest.raises(Exception, match="Could not find 'data/cifar'"):
        composed("data=cifar")


def test_train_py_prints_one_line_naming_the_key_and_exits_2(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "privacy.noise_multiplier=-0.5",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1]
        == "error: privacy.noise_multiplier=-0.5: must be > 0 and finite: without noise there is no privacy "
        "(use privacy=none to train without DP)"
    )
    assert not (tmp_path / "tensorboard").exists()  # stopped before training
