"""Fixed feature maps applied to each record before training.

A feature map here is a public function of one record alone (no parameter learnt from data), so each client
applying it to its own records spends no privacy, and the test set gets the same map.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from fl_dp_lightning.config import ConfigError

SCATTERING_SCALES = 2
"""J of the scattering transform: 28x28 images become 81 channels of 7x7 (Tramer and Boneh 2021)."""
SCATTERNET_SHAPE = (81, 7, 7)
"""The features of one 28x28 one-channel image, as every built-in source holds."""


def scattering(images: Tensor, chunk: int = 2048) -> Tensor:
    """ScatterNet features of ``(n, 1, H, W)`` images: kymatio's 2-D scattering transform with J = 2, as
    ``(n, 81, H / 4, W / 4)``."""
    try:  # the 2-D frontend alone: ``kymatio.torch`` also loads the 3-D one, which needs scipy < 1.15
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
    except ImportError as err:
        raise ConfigError("data.features='scatternet' needs kymatio: pip install -e '.[scatternet]'") from err
    transform = ScatteringTorch2D(J=SCATTERING_SCALES, shape=tuple(images.shape[-2:]))
    with torch.no_grad():
        return torch.cat([transform(part).flatten(1, 2) for part in images.split(chunk)])


FEATURES = {"scatternet": scattering}
"""``data.features`` values other than ``pixels``, each a map over a batch of images."""


def with_features(dataset: Dataset, name: str) -> Dataset:
    """``dataset`` with feature map ``name`` applied to its inputs (``pixels``: unchanged)."""
    if name == "pixels":
        return dataset
    if not isinstance(dataset, TensorDataset):
        raise ConfigError(
            f"data.features={name!r} maps in-memory tensors; got a {type(dataset).__name__}: use a built-in data "
            "set or pass TensorDatasets"
        )
    images, *rest = dataset.tensors
    return TensorDataset(FEATURES[name](images), *rest)
