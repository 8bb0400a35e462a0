import gzip
from pathlib import Path

import pytest
import torch

from fl_dp_lightning.config import ConfigError
from fl_dp_lightning.data import sources
from fl_dp_lightning.data.sources import PACKAGED_MNIST, load_fashion_mnist, load_mnist, read_idx

SHARED_MNIST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist-t10k"


def test_packaged_mnist_is_the_real_test_set():
    images = read_idx(PACKAGED_MNIST / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(PACKAGED_MNIST / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]  # as published
    counts = torch.bincount(labels.long(), minlength=10)
    assert counts.sum() == 10000 and counts.min() > 850 and counts.max() < 1200


@pytest.mark.skipif(not SHARED_MNIST.exists(), reason="../shared is not beside this checkout")
def test_packaged_copy_equals_the_shared_files():
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert (PACKAGED_MNIST / name).read_bytes() == (SHARED_MNIST / name).read_bytes()


def test_drop_duplicate_images_keeps_first_occurrences_in_order():
    images = torch.tensor([[[1]], [[2]], [[1]], [[3]], [[2]]], dtype=torch.uint8)
    labels = torch.tensor([10, 20, 11, 30, 21])
    kept, kept_labels, dropped = sources.drop_duplicate_images(images, labels)
    assert dropped == 2
    assert kept.flatten().tolist() == [1, 2, 3] and kept_labels.tolist() == [10, 20, 30]


def test_read_idx_refuses_a_file_that_is_not_idx(tmp_path):
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(b"\x89PNG not an idx file"))
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        read_idx(bad)
    truncated = tmp_path / "short.gz"
    truncated.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2])))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(truncated)


def offline(name: str) -> type:
    """A torchvision data set class whose download fails, as it does without network."""

    def refuse(self, *args, **kwargs):
        raise RuntimeError(f"Error downloading {name}: no route to host")

    return type(name, (), {"__init__": refuse})


def test_mnist_falls_back_loudly_to_the_packaged_subset_when_download_fails(tmp_path, monkeypatch, caplog):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline("MNIST"))
    source = load_mnist(tmp_path, seed=0)
    assert [r.getMessage().count("FALLING BACK") for r in caplog.records if "FALLING" in r.getMessage()] == [1]
    assert "packaged MNIST" in source.origin
    x_train, y_train = source.train.tensors
    x_test, _ = source.test.tensors
    assert x_train.shape == (8000, 1, 28, 28) and x_test.shape[1:] == (1, 28, 28)
    assert 1900 <= len(x_test) <= 2000  # the rest of the 10,000 after exact repeats are dropped
    # normalized with MNIST's mean and std: the background pixel value is -mean/std
    assert x_train.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    # train and test are a split of the 10,000 digits: no image is in both
    train_rows = {row.tobytes() for row in x_train.flatten(1).numpy()}
    assert not any(row.tobytes() in train_rows for row in x_test.flatten(1).numpy())
    assert len(torch.unique(y_train)) == 10


def write_damaged_files(raw: Path) -> None:
    """The four files torchvision looks for, each a header and then a cut-off body."""
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            (raw / f"{split}-{kind}-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 20)


def test_damaged_mnist_files_are_refused_naming_the_folder_instead_of_falling_back(tmp_path):
    write_damaged_files(tmp_path / "MNIST" / "raw")
    with pytest.raises(ConfigError, match=f"data.root='{tmp_path}': the MNIST files under .* cannot be read"):
        load_mnist(tmp_path)


def test_fashion_mnist_offline_without_the_debian_package_is_one_line_naming_the_fixes(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline("FashionMNIST"))
    with pytest.raises(ConfigError) as refused:
        load_fashion_mnist(tmp_path)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"data.root='{tmp_path}': FashionMNIST is not under")
    assert "apt-get install dataset-fashion-mnist" in message and "data=synthetic" in message


def test_damaged_fashion_mnist_files_are_refused_naming_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    raw = tmp_path / "FashionMNIST" / "raw"
    write_damaged_files(raw)
    with pytest.raises(ConfigError, match=f"the FashionMNIST files under {raw} cannot be read"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not sources.DEBIAN_FASHION_MNIST.exists(), reason="apt package dataset-fashion-mnist absent")
def test_fashion_mnist_comes_from_the_debian_package():
    source = load_fashion_mnist()
    assert len(source.train) == 60000 and len(source.test) == 10000
    assert torch.bincount(source.train.tensors[1]).tolist() == [6000] * 10
    assert "Debian" in source.origin
