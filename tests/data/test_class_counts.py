"""Every client's records per class: the pure table, the labelled picture, and when the logger releases them."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fl_dp_lightning import FederatedDataModule, FederatedDPStrategy, PrivacyConfig
from fl_dp_lightning.dashboard import counts_figure
from fl_dp_lightning.data.class_counts import class_counts, counts_markdown

from ..conftest import make_trainer
from ..strategy.test_strategy import small_classifier


def test_counts_table_and_heat_map_follow_the_labels():
    labels = {"a": torch.tensor([0, 0, 2]), "b": torch.tensor([1, 1, 1, 1]), "c": torch.tensor([], dtype=torch.long)}
    counts = class_counts(labels)
    assert counts.tolist() == [[2, 0, 1], [0, 4, 0], [0, 0, 0]]
    assert counts_markdown(list(labels), counts).splitlines()[2:] == [
        "| a | 2 | 0 | 1 | 3 |",
        "| b | 0 | 4 | 0 | 4 |",
        "| c | 0 | 0 | 0 | 0 |",
    ]
    figure = counts_figure(list(labels), counts)
    heat, colour_bar = figure.axes
    assert [t.get_text() for t in heat.get_yticklabels()] == ["a", "b", "c"]  # rows named by client
    assert [t.get_text() for t in heat.get_xticklabels()] == ["0", "1", "2"] and heat.get_xlabel() == "class"
    assert colour_bar.get_ylabel() == "share of the client's records"
    shares = heat.images[0].get_array()
    assert shares[1].tolist() == [0, 1, 0] and shares[0, 0] == pytest.approx(2 / 3) and shares[2].sum() == 0
    assert [t.get_text() for t in heat.texts] == [str(v) for v in counts.flatten().tolist()]  # each cell's count


def fit(synthetic, tmp_path, privacy):
    datamodule = FederatedDataModule(
        train=synthetic.train, test=synthetic.test, clients=4, partition="shards", batch_size=16, seed=1
    )
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version="")
    strategy = FederatedDPStrategy(privacy=privacy)
    make_trainer(strategy, 1, logger=logger).fit(small_classifier(), datamodule)
    return strategy, tmp_path / "tb"


def test_without_dp_the_counts_are_logged_as_text_table_and_picture(synthetic, tmp_path):
    strategy, folder = fit(synthetic, tmp_path, PrivacyConfig(enabled=False))
    table = (folder / "class_counts.md").read_text().splitlines()
    for line, (name, client) in zip(table[2:], strategy.clients.items()):
        expected = torch.bincount(client.dataset.tensors[1], minlength=10).tolist()
        assert line == f"| {name} | " + " | ".join(map(str, expected)) + f" | {sum(expected)} |"
    width, height = Image.open(folder / "class_counts.png").size
    assert width > 400 and height > 200  # a figure with its labels, not a bare tensor
    events = EventAccumulator(str(folder), size_guidance={"images": 1, "tensors": 1})
    events.Reload()
    assert "partition/class_counts" in events.Tags()["images"]
    assert any("partition/class_counts" in tag for tag in events.Tags()["tensors"])  # text lives in tensors


def test_under_dp_counts_stay_in_unless_released_and_then_the_report_says_so(synthetic, tmp_path):
    _, folder = fit(synthetic, tmp_path / "dp", PrivacyConfig(noise_multiplier=1.0))
    assert not (folder / "class_counts.md").exists()
    released = PrivacyConfig(noise_multiplier=1.0, unsafe_release_class_counts=True)
    _, folder = fit(synthetic, tmp_path / "released", released)
    assert (folder / "class_counts.md").exists()
    report = json.loads((folder / "privacy_report.json").read_text())
    assert any(line.startswith("privacy.unsafe_release_class_counts") for line in report["not_covered"])
    assert report["guarantee"].startswith("none proven")
