"""Validation and test read different public records: model selection never sees the test set."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from fl_dp_lightning import ConfigError, FederatedDataModule


def records(loader) -> set[bytes]:
    return {bytes(x.numpy().tobytes()) for batch in loader for x in batch[0]}


@pytest.mark.parametrize("source", ["synthetic", "mnist"])
def test_the_validation_and_test_loaders_hold_disjoint_records_that_together_are_the_public_set(source):
    datamodule = FederatedDataModule(source=source, batch_size=32, validation_fraction=0.2)
    datamodule.setup("fit")
    validation, test = records(datamodule.val_dataloader()), records(datamodule.test_dataloader())
    public = len(datamodule.public_set)
    assert not validation & test and len(validation) + len(test) == public  # the public sets hold no duplicates
    assert len(validation) == round(0.2 * public)
    again = FederatedDataModule(source=source, batch_size=32, validation_fraction=0.2)
    again.setup("fit")
    assert records(again.val_dataloader()) == validation  # a split of the public seed alone


def test_a_public_set_too_small_to_split_is_refused_in_one_line():
    data = TensorDataset(torch.randn(40, 3), torch.arange(40) % 2)
    with pytest.raises(ConfigError, match="validation and test need at least one each"):
        FederatedDataModule(train=data, test=TensorDataset(torch.randn(1, 3), torch.ones(1).long())).setup("fit")
    with pytest.raises(ConfigError, match="data.validation_fraction=1.0: must be in"):
        FederatedDataModule(validation_fraction=1.0)
