"""The second audit's modules that mix records only on real batches (more than a few records, labels >= 2, from
their third call on) and a module that carries a hidden state across calls: each is refused before any privacy is
spent or, where the engine computes each record's gradient from its own forward, trains with every record's
influence on the clipped sum within DP-SGD's bound. Measured as an attacker would: replace one record and compare
the released clipped sums."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from fl_dp_lightning import FederatedDataModule, FederatedDPStrategy, PrivacyConfig
from fl_dp_lightning.config import EngineConfig
from fl_dp_lightning.runtime.client import make_client
from fl_dp_lightning.runtime.vectorized.engine import VectorizedClients
from fl_dp_lightning.update import RoundRequest

from ..conftest import make_trainer
from ..strategy.test_strategy import UnawareModule, weights


def centred(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(0, keepdim=True)


class MixesLargeBatches(UnawareModule):
    """Centres its input over the batch when the batch holds more than 6 records (the old probe used 6)."""

    def forward(self, x):
        return self.body(centred(x) if len(x) > 6 else x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


class MixesOnHighLabels(UnawareModule):
    """Centres its input over the batch when a label is >= 2 (the old probe drew labels in {0, 1})."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.body(centred(x) if bool((y >= 2).any()) else x), y)


class MixesFromThirdCall(UnawareModule):
    """Centres its input over the batch from its third call on (the old probe called training_step twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        x, y = batch
        return F.cross_entropy(self.body(centred(x) if self.calls >= 3 else x), y)


class HiddenState(UnawareModule):
    """Carries a state computed from the last batch into the next one, as Lightning's LSTM demo does."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        features = x.flatten(1)
        if self.hidden is not None:
            features = features + self.hidden.mean() * torch.ones_like(features)
        self.hidden = features.detach().mean(0)
        return F.cross_entropy(self.body(features.view_as(x)), y)


def datamodule(synthetic) -> FederatedDataModule:
    return FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=2, batch_size=32)


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (MixesLargeBatches, "removing one record of a batch of 32 changed the other records' per-example"),
        (MixesOnHighLabels, "removing one record of a batch of 32 changed the other records' per-example"),
        (MixesFromThirdCall, "removing one record|other per-example gradients for the same batch"),
        (HiddenState, r"keeps state across calls in \['hidden'\]"),
    ],
)
def test_modules_that_mix_only_on_real_batches_are_refused_before_any_privacy_is_spent(synthetic, module, message):
    instance = module()
    before = weights(instance)
    strategy = FederatedDPStrategy(privacy=PrivacyConfig())
    with pytest.raises(ValueError, match=message):
        make_trainer(strategy, 1).fit(instance, datamodule(synthetic))
    assert all(torch.equal(before[k], v) for k, v in weights(instance).items())
    assert all(not c.accountant.history for c in strategy.clients.values())


def test_a_stateless_module_with_batch_idx_omitted_passes_the_probe(synthetic):
    class NoBatchIdx(UnawareModule):
        def training_step(self, batch):
            x, y = batch
            return F.cross_entropy(self.body(x), y)

    strategy = FederatedDPStrategy(privacy=PrivacyConfig())
    make_trainer(strategy, 1, limit_val_batches=0).fit(NoBatchIdx(), datamodule(synthetic))
    assert all(c.accountant.history for c in strategy.clients.values())


class MixingForward(nn.Module):
    """A forward that centres over the batch when it holds more than 2 records (the old trial used 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

    def forward(self, x):
        return self.body(centred(x) if len(x) > 2 else x)


class MixingClassifier(UnawareModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = MixingForward()

    def forward(self, x):
        return self.body(x)


def released_sum(module_factory, data, per_example: str) -> dict[str, torch.Tensor]:
    """What the vectorized engine's first step releases for each client: its clipped, summed gradient plus noise,
    read through one SGD step of lr 1 from the same start. The noise is seeded (the unsafe opt-in) so that it is
    the same in two runs and cancels in their difference: what remains is the clipped sum's change."""
    torch.manual_seed(0)
    module = module_factory()
    privacy = PrivacyConfig(max_grad_norm=0.1, loss_reduction="sum", unsafe_seeded_randomness=True)
    strategy_clients = []
    for i, (name, dataset) in enumerate(data.items()):
        client = make_client(
            name,
            i,
            dataset,
            privacy=privacy,
            batch_size=len(dataset),
            local_epochs=1,
            seed=0,
            device=torch.device("cpu"),
        )  # fmt: skip: sample rate 1, one step: every record in one batch
        strategy_clients.append(client)
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    clients = VectorizedClients(
        module, optimizer, data, strategy_clients, engine=EngineConfig(name="vectorized", per_example=per_example,
        loss="cross_entropy"), privacy=privacy, device=torch.device("cpu"),
    )  # fmt: skip
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    released = {}
    for update in clients.train(RoundRequest(1), strategy_clients):
        released[update.client] = torch.cat([(start[n] - p).flatten() for n, p in update.params.items()])
    return released


def test_the_vectorized_engine_keeps_a_mixing_forward_within_each_clients_bound(synthetic):
    """Replacing one of alice's records must move bob's released sum by nothing, and alice's by at most 2 C."""
    x, y = synthetic.train.tensors
    alice, bob = (x[:12], y[:12]), (x[12:24], y[12:24])
    neighbour = (torch.cat([alice[0][:-1], 10 * x[100:101]]), torch.cat([alice[1][:-1], y[100:101]]))
    for per_example in ("auto", "vmap"):
        first = released_sum(
            MixingClassifier, {"alice": TensorDataset(*alice), "bob": TensorDataset(*bob)}, per_example
        )
        second = released_sum(
            MixingClassifier, {"alice": TensorDataset(*neighbour), "bob": TensorDataset(*bob)}, per_example
        )
        bob_moved = float((first["bob"] - second["bob"]).norm())
        alice_moved = float((first["alice"] - second["alice"]).norm())
        assert bob_moved < 1e-5, (per_example, bob_moved)
        assert alice_moved <= 2 * 0.1 + 1e-5, (per_example, alice_moved)
