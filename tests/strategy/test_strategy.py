"""FederatedDPStrategy through real Trainers, each result checked against a computation made another way."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from fl_dp_lightning import FederatedDataModule, FederatedDPStrategy, LitClassifier, PrivacyConfig
from fl_dp_lightning.privacy.per_example import channels_last
from fl_dp_lightning.privacy.randomness import client_seed
from fl_dp_lightning.server.aggregate import fedavg

from ..conftest import RecordingLogger, direct_epsilon, make_trainer


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_weights(a: nn.Module, b: nn.Module, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=atol, rtol=0), key


def small_classifier(lr: float = 0.05) -> LitClassifier:
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    return LitClassifier(net, lr=lr)


def split(dataset: TensorDataset, sizes: list[int]) -> list[TensorDataset]:
    x, y = dataset.tensors
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return [TensorDataset(x[a:b], y[a:b]) for a, b in zip(bounds, bounds[1:])]


NO_VAL = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")


@NO_VAL
def test_one_client_without_privacy_equals_a_plain_lightning_run(synthetic):
    batch, seed, rounds = 32, 7, 3
    pl.seed_everything(0)
    init = LitClassifier(lr=0.05)  # the seed CNN
    federated, plain = copy.deepcopy(init), copy.deepcopy(init)

    datamodule = FederatedDataModule(train={"only": synthetic.train}, test=synthetic.test, batch_size=batch)
    strategy = FederatedDPStrategy(privacy=PrivacyConfig(enabled=False), seed=seed)
    make_trainer(strategy, rounds).fit(federated, datamodule)

    # plain Lightning: a shuffling loader drawing from the client's sampler stream, with the weights in the layout
    # the strategy trains in on CPU cores (engine.memory_format=auto: the same values, other rounding)
    for param in plain.parameters():
        param.data = channels_last(param.data)
    gen = torch.Generator().manual_seed(client_seed(seed, 0))
    sampler = BatchSampler(RandomSampler(synthetic.train, generator=gen), batch, drop_last=True)
    make_trainer("auto", rounds).fit(plain, DataLoader(synthetic.train, batch_sampler=sampler))

    assert_same_weights(federated, plain, atol=1e-6)
    assert not torch.equal(weights(federated)["net.0.weight"], weights(init)["net.0.weight"])


def test_two_clients_without_privacy_equal_a_hand_written_fedavg_round(synthetic):
    batch, seed = 50, 11
    parts = split(synthetic.train, [300, 700])
    pl.seed_everything(1)
    init = small_classifier()
    federated = copy.deepcopy(init)
    datamodule = FederatedDataModule(train={"a": parts[0], "b": parts[1]}, test=synthetic.test, batch_size=batch)
    make_trainer(FederatedDPStrategy(privacy=PrivacyConfig(enabled=False), seed=seed), 1).fit(federated, datamodule)

    # by hand: each client runs SGD from the initial weights over its own shuffled batches, then FedAvg
    states = []
    for index, part in enumerate(parts):
        model = copy.deepcopy(init.net)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(client_seed(seed, index))
        for idx in BatchSampler(RandomSampler(range(len(part)), generator=gen), batch, drop_last=True):
            x, y = part.tensors[0][idx], part.tensors[1][idx]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        states.append(model.state_dict())
    expected = fedavg(states, [300, 700])
    for key, value in expected.items():
        assert torch.allclose(federated.net.state_dict()[key], value, atol=1e-6, rtol=0), key


def test_each_clients_epsilon_equals_a_direct_replace_one_computation(synthetic):
    sizes, batch, sigma, delta, rounds = [200, 350, 600], 40, 1.1, 1e-5, 3
    parts = split(synthetic.train, sizes)
    names = ["clinic", "hospital", "lab"]
    logger = RecordingLogger()
    datamodule = FederatedDataModule(train=dict(zip(names, parts)), test=synthetic.test, batch_size=batch)
    privacy = PrivacyConfig(noise_multiplier=sigma, delta=delta)
    make_trainer(FederatedDPStrategy(privacy=privacy), rounds, logger=logger).fit(small_classifier(), datamodule)

    for name, n in zip(names, sizes):
        q = batch / n
        logged = logger.series(f"privacy/epsilon/{name}")
        assert sorted(logged) == list(range(rounds))
        for r in range(rounds):
            steps = (r + 1) * int(1 / q)  # one expected pass per round, as Opacus counts it
            assert logged[r] == pytest.approx(direct_epsilon(q, sigma, steps, delta), abs=1e-9), (name, r)
    maxima = logger.series("privacy/epsilon_max")
    assert maxima[rounds - 1] == pytest.approx(max(logger.series(f"privacy/epsilon/{n}")[rounds - 1] for n in names))


def fit_accuracy(synthetic, noise: float, rounds: int = 3) -> float:
    pl.seed_everything(0)
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=["a", "b"], batch_size=32)
    trainer = make_trainer(FederatedDPStrategy(privacy=PrivacyConfig(noise_multiplier=noise)), rounds)
    module = small_classifier(lr=0.1)
    trainer.fit(module, datamodule)
    return trainer.validate(module, datamodule, verbose=False)[0]["val/acc"]


def test_the_dp_step_really_runs_noise_1000_destroys_accuracy(synthetic):
    # opacus issue 313: an optimizer that bypasses DP trains as if noise were 0
    learned, destroyed = fit_accuracy(synthetic, noise=0.5), fit_accuracy(synthetic, noise=1000.0)
    assert learned > 0.6
    assert destroyed < 0.3


class UnawareModule(pl.LightningModule):
    """Written without any knowledge of fl_dp_lightning: its own optimizer, plain self.log."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.Tanh(), nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.body(x), y)
        self.log("my_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("my_acc", (self.body(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def test_an_unaware_lightning_module_trains_under_the_strategy_and_beats_chance(synthetic):
    pl.seed_everything(0)
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=3, batch_size=32)
    module = UnawareModule()
    trainer = make_trainer(FederatedDPStrategy(privacy=PrivacyConfig(noise_multiplier=1.0)), 3)
    trainer.fit(module, datamodule)
    assert trainer.validate(module, datamodule, verbose=False)[0]["my_acc"] > 0.5  # chance is 0.1
    assert not any(hasattr(m, "_forward_hooks") and m._forward_hooks for m in module.modules())  # Opacus hooks removed


def test_empty_poisson_batches_still_add_noise_and_count_and_log_no_nan():
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 1, 28, 28, generator=gen), torch.randint(0, 10, (40,), generator=gen))
    logger = RecordingLogger()
    # expected batch 1 of 40 records: P(empty batch) = (39/40)^40 ~ 36%
    datamodule = FederatedDataModule(train={"a": data}, test=data, batch_size=1)
    strategy = FederatedDPStrategy(privacy=PrivacyConfig(noise_multiplier=1.0))
    module = small_classifier()
    seen = []

    class CountBatches(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(len(batch[0]))

    make_trainer(strategy, 2, logger=logger, callbacks=[CountBatches()]).fit(module, datamodule)
    assert len(seen) == 2 * 40 and seen.count(0) > 0
    assert strategy.clients["a"].accountant.history == [(1.0, 1 / 40, 80)]  # every step accounted
    values = [v for _, m in logger.records for v in m.values()]
    assert values and all(v == v for v in values)  # no NaN anywhere


def test_validation_sees_the_aggregated_global_model(synthetic):
    parts = split(synthetic.train, [500, 500])
    seen = {}

    class Snapshot(pl.Callback):
        def on_validation_start(self, trainer, pl_module):
            seen["val"] = weights(pl_module)

    datamodule = FederatedDataModule(train={"a": parts[0], "b": parts[1]}, test=synthetic.test, batch_size=50)
    module = small_classifier()
    strategy = FederatedDPStrategy(privacy=PrivacyConfig(enabled=False))
    make_trainer(strategy, 1, callbacks=[Snapshot()]).fit(module, datamodule)
    assert all(torch.equal(seen["val"][k], v) for k, v in weights(module).items())
    assert [r.client for r in strategy.last_round] == ["a", "b"]


class BatchNormModule(UnawareModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))


class ManualModule(UnawareModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


@pytest.mark.parametrize(
    ("module", "trainer_kwargs", "message"),
    [
        (BatchNormModule, {}, "BatchNorm.*privacy.fix_modules=true"),
        (ManualModule, {}, "manual optimization is not supported"),
        (UnawareModule, {"accumulate_grad_batches": 2}, "accumulate_grad_batches=2"),
        (UnawareModule, {"gradient_clip_val": 1.0}, "gradient_clip_val=1.0"),
        (UnawareModule, {"limit_train_batches": 0.5}, "limit_train_batches=0.5"),
    ],
)
def test_unsupported_modules_and_settings_are_refused_before_training(synthetic, module, trainer_kwargs, message):
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=2, batch_size=32)
    instance = module()
    before = weights(instance)
    with pytest.raises(ValueError, match=message):
        make_trainer(FederatedDPStrategy(), 1, **trainer_kwargs).fit(instance, datamodule)
    assert all(torch.equal(before[k], v) for k, v in weights(instance).items())  # nothing trained


@NO_VAL
def test_a_plain_dataloader_is_refused_with_the_fix(synthetic):
    with pytest.raises(TypeError, match="FederatedDataModule"):
        make_trainer(FederatedDPStrategy(), 1).fit(UnawareModule(), DataLoader(synthetic.train, batch_size=32))


def test_a_client_smaller_than_the_batch_is_refused(synthetic):
    small = split(synthetic.train, [10])[0]
    datamodule = FederatedDataModule(train={"tiny": small}, test=synthetic.test, batch_size=32)
    with pytest.raises(ValueError, match="'tiny' holds 10 examples, fewer than the batch size 32"):
        make_trainer(FederatedDPStrategy(), 1).fit(UnawareModule(), datamodule)
