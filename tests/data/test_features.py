"""ScatterNet features (data.features=scatternet) and the model on top of them (model=scatternet)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from fl_dp_lightning.config import ConfigError
from fl_dp_lightning.data import FederatedDataModule
from fl_dp_lightning.data.features import scattering, with_features
from fl_dp_lightning.models import scatternet_linear

pytest.importorskip("kymatio")


def test_scattering_is_a_function_of_each_record_alone():
    # a client's features may not depend on its other records (that would need accounting): batch == one by one
    images = torch.randn(6, 1, 28, 28)
    together = scattering(images)
    alone = torch.cat([scattering(image[None]) for image in images])
    assert together.shape == (6, 81, 7, 7)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_scattering_first_channel_is_the_low_pass_average():
    # order 0 of the transform is the image blurred by a Gaussian and subsampled by 4: a constant image stays one
    constant = torch.full((1, 1, 28, 28), 3.0)
    torch.testing.assert_close(scattering(constant)[0, 0], torch.full((7, 7), 3.0), rtol=1e-3, atol=1e-3)
    assert scattering(constant)[0, 1:].abs().max() < 1e-3  # no edges: every wavelet coefficient vanishes


def test_with_features_keeps_labels_and_refuses_what_it_cannot_map():
    data = TensorDataset(torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]))
    mapped = with_features(data, "scatternet")
    assert mapped.tensors[0].shape == (4, 81, 7, 7) and torch.equal(mapped.tensors[1], data.tensors[1])
    assert with_features(data, "pixels") is data
    with pytest.raises(ConfigError, match="data.features='scatternet'.*TensorDataset"):
        with_features(torch.utils.data.Subset(data, [0, 1]), "scatternet")


def test_datamodule_maps_every_client_and_the_test_set_and_the_linear_model_fits_them():
    datamodule = FederatedDataModule(source="synthetic", synthetic_sizes=(40, 10), features="scatternet")
    datamodule.setup("fit")
    shapes = {tuple(ds[0][0].shape) for ds in datamodule.client_datasets.values()}
    assert shapes == {(81, 7, 7)} and tuple(datamodule.test_set[0][0].shape) == (81, 7, 7)
    assert "scatternet" in datamodule.data_origin
    logits = scatternet_linear()(torch.stack([datamodule.test_set[i][0] for i in range(3)]))
    assert logits.shape == (3, 10)


def test_unknown_features_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="data.features.*'wavelets'"):
        FederatedDataModule(source="synthetic", features="wavelets")
