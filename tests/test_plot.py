"""A Hydra sweep of train.py, collected by ``python -m fl_dp_lightning.plot`` into a table and a picture."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.filterwarnings("ignore")
def test_a_sweep_becomes_one_table_and_one_plot(tmp_path):
    sweep = tmp_path / "sweep"
    overrides = ["data=synthetic", "trainer.rounds=1", "trainer.batch_size=50", "trainer.progress_bar=false"]
    command = [sys.executable, "train.py", "-m", "privacy.noise_multiplier=0.8,1.6", *overrides]
    subprocess.run([*command, f"hydra.sweep.dir={sweep}"], cwd=ROOT, check=True, capture_output=True, timeout=600)
    out = subprocess.run(
        [sys.executable, "-m", "fl_dp_lightning.plot", str(sweep)], cwd=ROOT, check=True, capture_output=True, text=True
    )
    rows = json.loads((sweep / "sweep.json").read_text())
    assert len(rows) == 2 and (sweep / "sweep.png").exists() and "sweep.md" in out.stdout
    for row in rows:
        results = json.loads((sweep / row["run"] / "results.json").read_text())
        assert row["epsilon"] == max(results["epsilon"].values()) and row["test_acc"] == results["test"]["test/acc"]
    by_noise = {row["overrides"][0]: row["epsilon"] for row in rows}
    assert by_noise["privacy.noise_multiplier=0.8"] > by_noise["privacy.noise_multiplier=1.6"]
    table = (sweep / "sweep.md").read_text().splitlines()
    assert len(table) == 4 and "privacy.noise_multiplier=1.6" in table[2]  # sorted by epsilon, smallest first


def test_a_folder_without_runs_is_refused_in_one_line(tmp_path):
    command = [sys.executable, "-m", "fl_dp_lightning.plot", str(tmp_path)]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and out.stderr.strip().startswith("error: no results.json under")


def test_the_plot_labels_every_point_inside_the_figure_with_ticks_apart_and_only_settings_in_the_title():
    from fl_dp_lightning.plot import figure

    shared = ["data=fashion_mnist", "trainer.rounds=5", "trainer.progress_bar=False"]
    rows = [
        {"overrides": [f"privacy.target_epsilon={e}", *shared], "epsilon": e * 0.99, "test_acc": 0.6 + e / 40}
        for e in (0.5, 1, 2, 4, 8)
    ] + [{"overrides": ["privacy=none", *shared], "epsilon": None, "test_acc": 0.85}]
    fig = figure(rows)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    assert ax.get_title() == "data=fashion_mnist trainer.rounds=5"  # what each run shares, and only settings
    labels = [t for t in ax.get_xticklabels() if t.get_text()]
    assert [t.get_text() for t in labels] == ["0.495", "0.99", "1.98", "3.96", "7.92"]  # a tick per run
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    annotations = [t for t in ax.texts if t.get_text().startswith("privacy.target_epsilon=")]
    assert len(annotations) == 5 and "progress_bar" not in " ".join(t.get_text() for t in annotations)
    whole = fig.bbox
    for text in annotations:
        box = text.get_window_extent(renderer)
        assert whole.x0 <= box.x0 and box.x1 <= whole.x1 and whole.y0 <= box.y0 and box.y1 <= whole.y1  # not clipped
