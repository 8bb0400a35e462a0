"""Many clients in one process: one model instance, small lasting state per client."""

from __future__ import annotations

import pickle

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fl_dp_lightning import FederatedDataModule, FederatedDPStrategy, LitClassifier, PrivacyConfig

from ..conftest import make_trainer


def test_a_thousand_clients_of_sixty_examples_complete_a_round():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60_000, 8, generator=gen)
    y = (x[:, 0] > 0).long()
    data = TensorDataset(x, y)
    datamodule = FederatedDataModule(train=data, test=TensorDataset(x[:500], y[:500]), clients=1000, batch_size=30)
    module = LitClassifier(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), num_classes=2)
    strategy = FederatedDPStrategy(privacy=PrivacyConfig(noise_multiplier=1.0))
    pl.seed_everything(0)
    make_trainer(strategy, 1, limit_val_batches=0).fit(module, datamodule)

    assert len(strategy.last_round) == 1000 and {r.num_examples for r in strategy.last_round} == {60}
    assert all(c.accountant.history == [(1.0, 0.5, 2)] for c in strategy.clients.values())
    # what a client keeps between rounds: its accountant and settings, never model weights (and, by default,
    # never its secret random streams)
    lasting = [pickle.dumps(c.state_dict()) for c in strategy.clients.values()]
    assert max(len(b) for b in lasting) < 12_000
    assert all(
        set(c.state_dict()) == {"accountant", "noise_multiplier", "sample_rate", "steps_taken"}
        for c in strategy.clients.values()
    )
