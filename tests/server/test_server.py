"""Server optimizers: each update against a hand computation over several rounds, through the strategy, on resume."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from fl_dp_lightning import ConfigError, FederatedDataModule, FederatedDPStrategy, PrivacyConfig, ServerConfig
from fl_dp_lightning.server import apply_server_optimizer, server_step

from ..conftest import make_trainer
from ..strategy.test_strategy import small_classifier, weights

# a one-parameter model: global 1.0; the clients' averages over three rounds
AVERAGES = [3.0, 0.0, 2.5]


def by_hand(name: str, lr: float = 0.5, momentum: float = 0.9, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3):
    """Reddi et al.'s (and Hsu et al.'s) updates, written out with Python floats."""
    x, m, v, out = 1.0, 0.0, 0.0, []
    for avg in AVERAGES:
        delta = avg - x
        if name == "fedavg":
            x = x + lr * delta
        elif name == "fedavgm":
            m = momentum * m + delta
            x = x + lr * m
        else:
            m = b1 * m + (1 - b1) * delta
            if name == "fedadagrad":
                v = v + delta**2
            elif name == "fedadam":
                v = b2 * v + (1 - b2) * delta**2
            else:
                v = v - (1 - b2) * delta**2 * math.copysign(1.0, v - delta**2) if v != delta**2 else v
            x = x + lr * m / (math.sqrt(v) + tau)
        out.append(x)
    return out


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_each_server_optimizer_follows_its_update_rule_over_several_rounds(name):
    x, state, seen = {"w": torch.tensor([1.0])}, {}, []
    for avg in AVERAGES:
        x, state = server_step(name, x, {"w": torch.tensor([avg])}, state, lr=0.5)
        seen.append(float(x["w"]))
    assert seen == pytest.approx(by_hand(name), rel=1e-6)


def test_plain_fedavg_returns_the_average_itself_and_keeps_no_state():
    average = {"w": torch.tensor([0.1, 0.2])}
    stepped, state = apply_server_optimizer(ServerConfig(), {"w": torch.zeros(2)}, average, {})
    assert torch.equal(stepped["w"], average["w"]) and state == {}


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"optimizer": "sgd"}, "server.optimizer"),
        ({"lr": 0}, "server.lr"),
        ({"beta2": 1.0}, "server.beta2"),
        ({"tau": 0}, "server.tau"),
        ({"momentum": -0.1}, "server.momentum"),
    ],  # fmt: skip
)
def test_bad_server_settings_are_refused_naming_the_key(settings, key):
    with pytest.raises(ConfigError, match=key):
        ServerConfig(**settings)


def fit(synthetic, rounds, server, *, ckpt_dir=None, ckpt_path=None):
    pl.seed_everything(0)
    module = small_classifier()
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=["a", "b"], batch_size=40)
    privacy = PrivacyConfig(noise_multiplier=1.0, unsafe_seeded_randomness=True)  # runs compared bit for bit
    strategy = FederatedDPStrategy(privacy=privacy, server=server, seed=2)
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0)] if ckpt_dir else []
    trainer = make_trainer(strategy, rounds, enable_checkpointing=bool(ckpt_dir), callbacks=callbacks)
    trainer.fit(module, datamodule, ckpt_path=ckpt_path)
    return module, strategy


def test_the_strategy_applies_the_server_step_to_the_clients_average(synthetic):
    pl.seed_everything(0)
    start = weights(small_classifier())
    averaged, _ = fit(synthetic, 1, ServerConfig())  # the same clients, the same noise: their plain average
    adam = ServerConfig(optimizer="fedadam", lr=0.01)
    stepped, strategy = fit(synthetic, 1, adam)
    params = {k: v for k, v in weights(averaged).items() if not k.startswith(("train_acc", "val_acc", "test_acc"))}
    expected, state = server_step("fedadam", start, params, {}, lr=0.01)
    for key, value in expected.items():
        assert torch.allclose(weights(stepped)[key], value, atol=1e-6), key
    assert set(strategy.server_state) == {f"{m}.{k}" for m in "mv" for k in expected}


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resume_with_a_server_optimizer_is_exact(synthetic, tmp_path):
    yogi = ServerConfig(optimizer="fedyogi", lr=0.02)
    full, full_strategy = fit(synthetic, 3, yogi)
    fit(synthetic, 2, yogi, ckpt_dir=tmp_path)
    resumed, resumed_strategy = fit(synthetic, 3, yogi, ckpt_dir=tmp_path, ckpt_path=tmp_path / "last.ckpt")
    for key, value in weights(full).items():
        assert torch.allclose(weights(resumed)[key], value, atol=1e-6), key
    for key, value in full_strategy.server_state.items():
        assert torch.allclose(resumed_strategy.server_state[key], value, atol=1e-9), key
    with pytest.raises(ConfigError, match="server: checkpoint"):
        fit(synthetic, 3, ServerConfig(optimizer="fedadam"), ckpt_dir=tmp_path, ckpt_path=tmp_path / "last.ckpt")
