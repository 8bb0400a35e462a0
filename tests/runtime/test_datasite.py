"""What runs inside a datasite (fl_dp_lightning.runtime.syft.datasite imports no syft, so this runs everywhere):
the approved-round count is spent only where training starts."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from fl_dp_lightning import LitClassifier, PrivacyConfig
from fl_dp_lightning.config import ClientOverride, EngineConfig
from fl_dp_lightning.data.sources import load_synthetic
from fl_dp_lightning.runtime.syft.clients import module_spec
from fl_dp_lightning.runtime.syft.datasite import APPROVAL_USED, DatasiteClient
from fl_dp_lightning.runtime.vectorized.engine import SGD_SETTINGS


def terms(module: LitClassifier, approved_rounds: int) -> dict:
    names = {id(p): n for n, p in module.named_parameters()}
    return {
        "session": "s",
        "model": module_spec(module),
        "groups": [[names[id(p)] for p in g["params"]] for g in module.configure_optimizers().param_groups],
        "privacy": asdict(PrivacyConfig(unsafe_seeded_randomness=True)),
        "engine": asdict(EngineConfig(name="vectorized")),
        "batch_size": 32,
        "local_epochs": 1,
        "seed": 0,
        "approved_rounds": approved_rounds,
        "max_epsilon": None,
        "release_metrics": False,
        "client": "alice",
        "index": 0,
        "approval": 1,
        "override": asdict(ClientOverride()),
        "noise_multiplier": 1.0,
        "history": [],
        "steps_taken": 0,
    }


def test_a_round_that_fails_before_training_leaves_the_approval_unused():
    torch.manual_seed(0)
    module = LitClassifier(lr=0.05)
    source = load_synthetic(train_size=200, test_size=10, seed=3)
    records = {"x": source.train.tensors[0].numpy(), "y": source.train.tensors[1].numpy()}
    approved = terms(module, approved_rounds=1)
    client = DatasiteClient(records, approved)
    sgd = [{k: g[k] for k in SGD_SETTINGS} for g in module.configure_optimizers().param_groups]
    weights = {k: v.numpy() for k, v in module.state_dict().items()}
    bad = {**weights, next(iter(weights)): weights[next(iter(weights))][:1]}  # a tensor of the wrong shape
    with pytest.raises(RuntimeError):
        client.round({"weights": bad, "sgd": sgd, "proximal_mu": 0.0, "round": 1}, approved)
    assert client.rounds_run == {} and client.client.accountant.history == []  # nothing trained, nothing used
    reply = client.round({"weights": weights, "sgd": sgd, "proximal_mu": 0.0, "round": 1}, approved)
    assert reply["steps_taken"] > 0 and client.rounds_run == {1: 1}
    assert (
        client.round({"weights": weights, "sgd": sgd, "proximal_mu": 0.0, "round": 1}, approved)["refused"]
        == APPROVAL_USED
    )
