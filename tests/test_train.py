"""python train.py's run(): trains, logs epsilon to TensorBoard, writes a checkpoint and results."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fl_dp_lightning.checkpoint import CHECKPOINT_KEY

from .config.test_config import composed


def test_a_short_run_logs_every_clients_epsilon_per_round_to_tensorboard(tmp_path):
    from fl_dp_lightning.cli import run

    conf = composed(
        "data=synthetic",
        "trainer.rounds=2",
        "trainer.batch_size=32",
        "privacy.noise_multiplier=0.6",
        "trainer.progress_bar=false",
    )
    results = run(conf, tmp_path)

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("alice", "bob"):
        series = [e.value for e in events.Scalars(f"privacy/epsilon/{name}")]
        assert [e.step for e in events.Scalars(f"privacy/epsilon/{name}")] == [0, 1]
        assert series[1] == pytest.approx(results["epsilon"][name], rel=1e-6) and series[0] < series[1]
    assert {"privacy/epsilon_max", "val/acc"} <= tags
    # nothing computed from client records without noise reaches the logger (LitClassifier logs train/loss)
    assert not {tag for tag in tags if tag.startswith("train")}

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rounds"] == 2 and 0 <= saved["test"]["test/acc"] <= 1 and len(saved["seconds_per_round"]) == 2
    assert saved["epsilon"] == pytest.approx(results["epsilon"]) and saved["delta"] == 1e-5
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2 * 2 * int(1 / (32 / 1000))  # rounds x clients x Poisson steps
    assert set(checkpoint[CHECKPOINT_KEY]["clients"]) == {"alice", "bob"}
    assert (tmp_path / "tensorboard" / "hparams.yaml").read_text().count("synthetic") >= 1
