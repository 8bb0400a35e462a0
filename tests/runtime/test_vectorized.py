"""The vectorized engine against the Opacus engine and against hand computations."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import TensorDataset

from fl_dp_lightning import ConfigError, FederatedDataModule, FederatedDPStrategy, LitClassifier, PrivacyConfig
from fl_dp_lightning.config import ClientOverride, EngineConfig
from fl_dp_lightning.runtime.client import make_client
from fl_dp_lightning.runtime.sampling import on_device, take_batch
from fl_dp_lightning.runtime.vectorized.dpsgd import clip_and_sum, sgd_step
from fl_dp_lightning.runtime.vectorized.engine import VectorizedClients, static_width
from fl_dp_lightning.update import RoundRequest

from ..config.test_config import composed
from ..conftest import direct_epsilon, make_trainer
from ..strategy.test_strategy import small_classifier, weights

SEEDED = PrivacyConfig(noise_multiplier=1.0, unsafe_seeded_randomness=True)


def test_clip_and_sum_equals_clipping_each_example_by_hand():
    torch.manual_seed(0)
    grads = {"w": torch.randn(2, 5, 3, 4) * 3, "b": torch.randn(2, 5, 4)}
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float)
    clip = torch.tensor([1.0, 0.5])
    summed = clip_and_sum(grads, mask, clip)
    for c in range(2):
        expected = {k: torch.zeros_like(g[c, 0]) for k, g in grads.items()}
        for i in range(int(mask[c].sum())):
            norm = math.sqrt(sum(float(g[c, i].pow(2).sum()) for g in grads.values()))
            factor = min(1.0, float(clip[c]) / (norm + 1e-6))
            for k, g in grads.items():
                expected[k] += factor * g[c, i]
        for k in grads:
            torch.testing.assert_close(summed[k][c], expected[k], rtol=1e-5, atol=1e-6)


def test_padding_a_batch_with_masked_records_changes_nothing():
    torch.manual_seed(1)
    grads = {"w": torch.randn(1, 4, 6)}
    padded = {"w": torch.cat([grads["w"], torch.randn(1, 3, 6) * 100], dim=1)}  # garbage in the padding
    plain = clip_and_sum(grads, torch.ones(1, 4), torch.tensor([1.0]))
    masked = clip_and_sum(padded, torch.tensor([[1, 1, 1, 1, 0, 0, 0]], dtype=torch.float), torch.tensor([1.0]))
    assert torch.equal(plain["w"], masked["w"]) or torch.allclose(plain["w"], masked["w"], atol=1e-7, rtol=0)


@pytest.mark.parametrize(
    "settings",
    [
        dict(lr=0.1),
        dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3),
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
        dict(lr=0.1, maximize=True),
    ],
)
def test_sgd_step_equals_torch_sgd_over_several_steps(settings):
    torch.manual_seed(2)
    param = nn.Parameter(torch.randn(4, 3))
    optimizer = torch.optim.SGD([param], **settings)
    ours, buffer = param.detach().clone(), None
    for _ in range(3):
        gradient = torch.randn(4, 3)
        param.grad = gradient.clone()
        optimizer.step()
        ours, buffer = sgd_step(ours, gradient, buffer, **{"momentum": 0.0, **settings})
    torch.testing.assert_close(ours, param.detach(), rtol=1e-6, atol=1e-7)


def fit(synthetic, engine, *, privacy=SEEDED, rounds=2, overrides=None, mu=0.0, momentum=0.0, module=None, **kwargs):
    pl.seed_everything(0)
    module = module or LitClassifier(small_classifier().net, lr=0.05, momentum=momentum)
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=["a", "b", "c"], batch_size=32)
    strategy = FederatedDPStrategy(
        privacy=privacy, engine=engine, client_overrides=overrides, proximal_mu=mu, seed=5, log_rounds=False
    )
    make_trainer(strategy, rounds, **kwargs).fit(module, datamodule)
    return module, strategy


def assert_same_weights(a: nn.Module, b: nn.Module, atol: float = 1e-5) -> None:
    for key, value in weights(a).items():
        torch.testing.assert_close(weights(b)[key], value, atol=atol, rtol=0)


@pytest.mark.parametrize("chunk", [None, 2])
def test_the_vectorized_engine_trains_the_same_rounds_as_the_opacus_engine(synthetic, chunk):
    # same seeds: same Poisson batches and the same noise draws (Opacus's generator function, each client's own
    # stream); clients of different batch sizes take different numbers of steps; FedProx and momentum on top
    overrides = {"a": ClientOverride(batch_size=16, max_grad_norm=0.5), "c": ClientOverride(noise_multiplier=1.5)}
    opacus_module, opacus = fit(synthetic, "opacus", overrides=overrides, mu=0.1, momentum=0.5)
    engine = EngineConfig(name="vectorized", clients_per_chunk=chunk)
    vector_module, vector = fit(synthetic, engine, overrides=overrides, mu=0.1, momentum=0.5)
    assert_same_weights(opacus_module, vector_module)
    for name, client in opacus.clients.items():
        assert vector.clients[name].accountant.history == client.accountant.history
        assert vector.clients[name].steps_taken == client.steps_taken
    assert vector.epsilons() == opacus.epsilons()
    assert opacus.clients["a"].steps_per_round != opacus.clients["b"].steps_per_round


def test_without_privacy_the_engines_train_the_same_shuffled_batches(synthetic):
    off = PrivacyConfig(enabled=False)
    opacus_module, _ = fit(synthetic, "opacus", privacy=off)
    vector_module, _ = fit(synthetic, "vectorized", privacy=off)
    assert_same_weights(opacus_module, vector_module)


def engine_for(dataset: TensorDataset, privacy: PrivacyConfig, *, width: int | None = None, noise_seed: int = 0):
    """A one-client engine over the seed CNN's small cousin, with the client's noise stream seeded by hand."""
    torch.manual_seed(0)
    module = small_classifier()
    client = make_client(
        "a", 0, dataset, privacy=privacy, batch_size=32, local_epochs=1, seed=0, device=torch.device("cpu")
    )
    client.noise_rng = torch.Generator().manual_seed(noise_seed)
    engine = VectorizedClients(
        module,
        module.configure_optimizers(),
        {"a": dataset},
        [client],
        engine=EngineConfig(name="vectorized"),
        privacy=privacy,
        device=torch.device("cpu"),
    )
    engine.width = width
    return engine, client


def test_a_batch_cut_into_padded_slices_gives_the_same_update_as_one_unpadded_batch(synthetic):
    dataset = TensorDataset(*(t[:400] for t in synthetic.train.tensors))
    results = []
    for width in (None, 7):  # 7: each Poisson batch (about 32 records) becomes 4-6 padded slices
        engine, client = engine_for(dataset, SEEDED, width=width)
        (update,) = engine.train(RoundRequest(1, release_metrics=True), [client])
        results.append(update)
    for name, value in results[0].params.items():
        torch.testing.assert_close(results[1].params[name], value, atol=1e-6, rtol=0)
    assert results[0].metrics["loss"] == pytest.approx(results[1].metrics["loss"], rel=1e-5)


def test_the_noise_has_standard_deviation_noise_multiplier_times_clip_over_expected_batch(synthetic):
    # two runs on the same batches that differ only in the noise stream: their weights differ by
    # lr * (noise_1 - noise_2) / B, whose standard deviation is lr * sqrt(2) * sigma * S / B
    dataset = TensorDataset(*(t[:400] for t in synthetic.train.tensors))
    privacy = PrivacyConfig(noise_multiplier=1.3, max_grad_norm=0.7, unsafe_seeded_randomness=True)
    runs = []
    for noise_seed in (1, 2):
        engine, client = engine_for(dataset, privacy, noise_seed=noise_seed)
        client.steps_per_round = 1
        (update,) = engine.train(RoundRequest(1), [client])
        runs.append(torch.cat([p.flatten() for p in update.params.values()]))
    lr = engine.optimizer.param_groups[0]["lr"]
    measured = float((runs[0] - runs[1]).std()) / (lr * math.sqrt(2))
    expected = 1.3 * 0.7 / 32
    # the sample standard deviation of n Gaussian draws has relative standard error 1 / sqrt(2 (n - 1))
    tolerance = 5 / math.sqrt(2 * (runs[0].numel() - 1))
    assert measured == pytest.approx(expected, rel=tolerance)


def test_resume_is_exact_under_the_vectorized_engine(synthetic, tmp_path):
    full_module, full = fit(synthetic, "vectorized", rounds=3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    fit(synthetic, "vectorized", rounds=1, enable_checkpointing=True, callbacks=[checkpoint])
    pl.seed_everything(0)
    module = LitClassifier(small_classifier().net, lr=0.05)
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=["a", "b", "c"], batch_size=32)
    resumed = FederatedDPStrategy(privacy=SEEDED, engine="vectorized", seed=5, log_rounds=False)
    trainer = make_trainer(resumed, 3, enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=tmp_path)])
    trainer.fit(module, datamodule, ckpt_path=tmp_path / "last.ckpt")
    assert_same_weights(full_module, module, atol=1e-6)
    assert resumed.epsilons() == full.epsilons()


class CountingForward(LitClassifier):
    """A forward that changes state: it counts its calls in a buffer."""

    def __init__(self) -> None:
        super().__init__(small_classifier().net)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.net(x)


class BranchingForward(LitClassifier):
    """A forward whose Python control flow depends on the data, which vmap cannot trace."""

    def forward(self, x):
        return self.net(x) if x.sum() > 0 else -self.net(x)


class WithAdam(LitClassifier):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters())


class WithStepSchedule(LitClassifier):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, 10)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@pytest.mark.parametrize(
    ("module", "trainer_kwargs", "expected"),
    [
        (
            lambda: LitClassifier(nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))),
            {},
            "BatchNorm1d updates running statistics",
        ),
        (lambda: WithAdam(small_classifier().net), {}, "configure_optimizers returned Adam"),
        (lambda: WithStepSchedule(small_classifier().net), {}, "interval='epoch'"),
        (lambda: LitClassifier(small_classifier().net), {"precision": "bf16-mixed"}, "use precision=32"),
        (CountingForward, {}, "CountingForward.forward changes its buffers"),
        (lambda: BranchingForward(small_classifier().net), {}, "cannot transform BranchingForward.forward"),
    ],
)
def test_what_the_vectorized_engine_cannot_train_is_refused_before_any_privacy_is_spent(
    synthetic, module, trainer_kwargs, expected
):
    privacy = PrivacyConfig(noise_multiplier=1.0, fix_modules=False)
    strategy = FederatedDPStrategy(privacy=privacy, engine="vectorized", log_rounds=False)
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=2, batch_size=32)
    with pytest.raises(ConfigError, match=expected) as refused:
        make_trainer(strategy, 1, **trainer_kwargs).fit(module(), datamodule)
    assert "\n" not in str(refused.value) and "engine=opacus" in str(refused.value)
    assert all(not c.accountant.history for c in strategy.clients.values())


def test_a_time_limit_is_refused_with_the_vectorized_engine():
    with pytest.raises(ConfigError, match="client_time_limit=5.*engine=opacus"):
        FederatedDPStrategy(engine="vectorized", client_time_limit=5)


def test_static_widths_cover_a_poisson_batch_well_past_its_mean():
    assert static_width(32, poisson=False) == 32
    width = static_width(128, poisson=True)
    assert width % 8 == 0 and width >= 128 + 4 * math.sqrt(128)


def test_tensor_data_is_moved_to_the_training_device_once_and_batches_are_indexed_there(synthetic):
    # the meta device stands in for a GPU: no data is copied, but every tensor says where it lives
    other = torch.utils.data.Subset(synthetic.train, [0, 1, 2])
    moved = on_device({"a": synthetic.train, "b": other}, torch.device("meta"))
    assert all(t.device.type == "meta" for t in moved["a"].tensors) and moved["b"] is other
    x, y = take_batch(moved["a"], [3, 5, 8])
    assert x.device.type == "meta" and x.shape == (3, *synthetic.train.tensors[0].shape[1:]) and y.shape == (3,)
    assert on_device({"a": synthetic.train}, torch.device("cpu"))["a"] is synthetic.train  # already there


def test_train_py_trains_with_the_vectorized_engine_and_logs_the_same_epsilon(tmp_path):
    from fl_dp_lightning.cli import run

    overrides = ("data=synthetic", "engine=vectorized", "trainer.rounds=2", "trainer.batch_size=50")
    results = run(composed(*overrides, "trainer.progress_bar=false"), tmp_path)
    n = 2000 // 2  # the synthetic source's training set, split IID between alice and bob
    q = 50 / n
    expected = direct_epsilon(q, 1.2, 2 * int(1 / q), 1e-5)
    assert results["epsilon"] == {"alice": pytest.approx(expected, abs=1e-9), "bob": pytest.approx(expected, abs=1e-9)}
    assert results["rounds"] == 2 and 0 <= results["test"]["test/acc"] <= 1
