"""Data sources as normalized tensors: MNIST, Fashion-MNIST and a synthetic set.

Images are decoded once into float tensors (N, 1, 28, 28); there are no per-sample PIL transforms, so a
batch is one tensor index. Each loader returns a :class:`DataSource` that says where the data came from.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from fl_dp_lightning.config import ConfigError

log = logging.getLogger(__name__)

PACKAGED_MNIST = Path(__file__).parent / "assets" / "mnist-t10k"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
MNIST_MEAN_STD = (0.1307, 0.3081)
FASHION_MNIST_MEAN_STD = (0.2860, 0.3530)
REPLACE_FILE = "reinstall or re-download it (delete it and rerun to download again)"
FALLBACK_TRAIN_SIZE = 8000
"""Training examples taken from the packaged 10,000 MNIST test digits (the rest is the test split)."""


@dataclass(frozen=True)
class DataSource:
    """A loaded data set: train and test splits and a description of where it came from."""

    train: TensorDataset
    test: TensorDataset
    origin: str
    """Where the data came from, e.g. ``torchvision MNIST at data/`` (logged with the run's hparams)."""
    num_classes: int = 10
    """The classes of its integer labels (public: a property of the data set, not of any record)."""


def read_idx(path: Path) -> Tensor:
    """Reads an IDX file (the MNIST format), gzip-compressed or not, into a uint8 tensor."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # a damaged gzip stream
        raise ConfigError(f"{path} cannot be read ({err}); {REPLACE_FILE}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ConfigError(f"{path} is not an unsigned-byte IDX file (bad magic number {raw[:4]!r}); {REPLACE_FILE}")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ConfigError(f"{path}: header says shape {shape} but holds {data.size} values (truncated); {REPLACE_FILE}")
    return torch.from_numpy(data.reshape(shape).copy())


def to_dataset(images: Tensor, labels: Tensor, mean_std: tuple[float, float]) -> TensorDataset:
    """uint8 images (N, 28, 28) and labels (N,) -> normalized float (N, 1, 28, 28) and int64 labels."""
    mean, std = mean_std
    x = (images.float().div_(255.0).sub_(mean).div_(std)).unsqueeze(1)
    return TensorDataset(x, labels.long())


def drop_duplicate_images(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, int]:
    """Keeps the first occurrence of every exactly repeated image; returns images, labels, number dropped.

    A repeated image split into both train and test would leak test examples into training.
    """
    _, inverse = torch.unique(images.flatten(1), dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(images), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(images)), reduce="amin")
    keep = torch.sort(first).values
    return images[keep], labels[keep], len(images) - len(keep)


def read_idx_split(directory: Path, prefix: str, mean_std: tuple[float, float]) -> TensorDataset:
    """Reads ``<prefix>-images-idx3-ubyte.gz`` and ``<prefix>-labels-idx1-ubyte.gz`` from ``directory``."""
    images = read_idx(directory / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(directory / f"{prefix}-labels-idx1-ubyte.gz")
    if len(images) != len(labels):
        raise ConfigError(f"{directory}/{prefix}: {len(images)} images but {len(labels)} labels; {REPLACE_FILE}")
    return to_dataset(images, labels, mean_std)


def torchvision_split(cls: type, root: Path, train: bool, mean_std: tuple[float, float]) -> TensorDataset:
    """A torchvision MNIST-style split (downloaded into ``root`` if missing) as a tensor data set."""
    ds = cls(str(root), train=train, download=True)
    return to_dataset(ds.data, ds.targets, mean_std)


class DownloadFailed(Exception):
    """A torchvision data set is not under its root and could not be downloaded."""


def torchvision_source(cls: type, root: Path, mean_std: tuple[float, float]) -> DataSource:
    """Both splits of torchvision's ``cls`` (MNIST, FashionMNIST) under ``root``, downloaded if missing.

    Files that are there but cannot be read are a :class:`ConfigError` naming the folder (training on other data
    would hide it); a failed download raises :class:`DownloadFailed`.
    """
    raw = root / cls.__name__ / "raw"
    present = any(raw.glob("*ubyte*"))
    try:
        train = torchvision_split(cls, root, True, mean_std)
        test = torchvision_split(cls, root, False, mean_std)
    except (OSError, RuntimeError, ValueError) as err:  # torchvision raises RuntimeError when every mirror fails
        if present:
            raise ConfigError(
                f"data.root={str(root)!r}: the {cls.__name__} files under {raw} cannot be read "
                f"({type(err).__name__}: {err}); delete them to download again"
            ) from err
        raise DownloadFailed(
            f"{cls.__name__} is not under {root} and could not be downloaded ({type(err).__name__}: {err})"
        ) from err
    return DataSource(train, test, f"torchvision {cls.__name__} at {root}")


def load_mnist(root: str | Path = "data", seed: int = 0) -> DataSource:
    """MNIST from ``root`` (downloaded there if missing).

    When the download fails (offline), falls back, with a warning, to the 10,000 real MNIST test digits
    shipped in the package, de-duplicated and split 8,000 train / the rest test with a fixed seed.
    """
    from torchvision.datasets import MNIST

    try:
        return torchvision_source(MNIST, Path(root), MNIST_MEAN_STD)
    except DownloadFailed as err:
        message = (
            f"{err}. FALLING BACK to the 10,000 real MNIST test digits shipped with fl_dp_lightning, split "
            f"{FALLBACK_TRAIN_SIZE} train / the rest test: numbers are not comparable "
            "with full-MNIST results. Put the MNIST files under data.root to train on the real set."
        )
        log.warning(message)  # once: to the console and, under train.py, to train.log
    images = read_idx(PACKAGED_MNIST / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(PACKAGED_MNIST / "t10k-labels-idx1-ubyte.gz")
    images, labels, dropped = drop_duplicate_images(images, labels)
    if dropped:
        log.warning(f"dropped {dropped} exactly repeated images from the packaged MNIST subset before splitting")
    x, y = to_dataset(images, labels, MNIST_MEAN_STD).tensors
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train_idx, test_idx = order[:FALLBACK_TRAIN_SIZE], order[FALLBACK_TRAIN_SIZE:]
    return DataSource(
        TensorDataset(x[train_idx], y[train_idx]),
        TensorDataset(x[test_idx], y[test_idx]),
        f"packaged MNIST t10k subset ({FALLBACK_TRAIN_SIZE} train / {len(test_idx)} test, "
        f"{dropped} repeated images dropped, seed {seed})",
    )


def load_fashion_mnist(root: str | Path = "data", seed: int = 0) -> DataSource:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package when installed, else from ``root``."""
    if (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        train = read_idx_split(DEBIAN_FASHION_MNIST, "train", FASHION_MNIST_MEAN_STD)
        test = read_idx_split(DEBIAN_FASHION_MNIST, "t10k", FASHION_MNIST_MEAN_STD)
        return DataSource(train, test, f"Debian dataset-fashion-mnist at {DEBIAN_FASHION_MNIST}")
    from torchvision.datasets import FashionMNIST

    root = Path(root)
    try:
        return torchvision_source(FashionMNIST, root, FASHION_MNIST_MEAN_STD)
    except DownloadFailed as err:
        raise ConfigError(
            f"data.root={str(root)!r}: {err}; install Debian's dataset-fashion-mnist (apt-get install "
            f"dataset-fashion-mnist), put the Fashion-MNIST files under {root / 'FashionMNIST' / 'raw'}, or choose "
            "data=mnist or data=synthetic"
        ) from None


def load_synthetic(train_size: int = 2000, test_size: int = 500, seed: int = 0, num_classes: int = 10) -> DataSource:
    """Learnable synthetic 1x28x28 images: a random template per class plus Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(num_classes, 1, 28, 28, generator=gen)

    def draw(n: int) -> TensorDataset:
        y = torch.randint(0, num_classes, (n,), generator=gen)
        x = templates[y] + 1.5 * torch.randn(n, 1, 28, 28, generator=gen)
        return TensorDataset(x, y)

    return DataSource(draw(train_size), draw(test_size), f"synthetic ({num_classes} classes, seed {seed})", num_classes)
