"""Training labels outside the classes of the public test set are refused at load, before any privacy is spent."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from fl_dp_lightning import ConfigError, FederatedDataModule


@pytest.mark.parametrize("bad", [10, -1])
def test_a_client_with_labels_outside_the_classes_is_refused_at_load(synthetic, bad):
    x, y = synthetic.train.tensors
    labels = y.clone()
    labels[7] = bad
    datamodule = FederatedDataModule(train=TensorDataset(x, labels), test=synthetic.test, clients=2, batch_size=32)
    with pytest.raises(ConfigError, match=r"client 'client_[01]' holds training labels outside \[0, 10\)"):
        datamodule.setup("fit")


def test_labels_within_the_classes_load_and_the_probe_gets_the_public_set(synthetic):
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=2, batch_size=32)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    assert loader.num_classes == int(synthetic.test.tensors[1].max()) + 1 == 10
    assert loader.public is datamodule.public_set
    assert torch.equal(loader.public.tensors[0], synthetic.test.tensors[0])
