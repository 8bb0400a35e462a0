"""A real `python train.py` process, killed in round 3 of 3, resumes from round 2's checkpoint to the same epsilon
as an uninterrupted run (SIGKILL: nothing runs at exit; SIGINT and SIGTERM, as schedulers send it: Lightning's
graceful shutdown, then a non-zero exit and the resume command)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ARGS = [
    "data=synthetic",
    "data.synthetic_train_size=6000",
    "data.synthetic_test_size=200",
    "trainer.rounds=3",
    "trainer.batch_size=16",
    "trainer.progress_bar=false",
]


def train(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *ARGS, f"hydra.run.dir={run_dir}", *extra],
        cwd=run_dir.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # a shell without job control starts background jobs with SIGINT ignored, and children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def saved_round(checkpoint: Path) -> int | None:
    """The round (1-based) a checkpoint ends, or None while there is none."""
    if not checkpoint.exists():
        return None
    return torch.load(checkpoint, weights_only=True, map_location="cpu")["epoch"] + 1


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("full") / "run"
    process = train(run_dir)
    assert process.wait(timeout=600) == 0, process.stderr.read()
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["SIGKILL", "SIGINT", "SIGTERM"])
def test_a_train_py_run_killed_in_round_3_resumes_from_round_2_to_the_same_epsilon(tmp_path, uninterrupted, sig):
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    process = train(run_dir)
    deadline = time.monotonic() + 300
    while saved_round(checkpoint) != 2:  # atomic writes: a checkpoint is either absent or whole
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before round 2's checkpoint"
        time.sleep(0.05)
    process.send_signal(sig)  # as round 3 starts (it takes seconds: 2 x 187 steps)
    status = process.wait(timeout=120)
    assert status == (-sig if sig == signal.SIGKILL else 128 + sig)  # a scheduler sees that it did not finish
    if sig != signal.SIGKILL:
        line = process.stderr.read().strip().splitlines()[-1]
        assert line.startswith(f"error: stopped by {sig.name}") and line.endswith(f"trainer.ckpt_path={checkpoint}")
    assert saved_round(checkpoint) == 2  # killed before round 3 ended, round 2's checkpoint intact
    assert not (run_dir / "results.json").exists()

    resumed = train(run_dir, f"trainer.ckpt_path={checkpoint}")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epsilon"] == uninterrupted["epsilon"]  # exact: the accountants continued where they stopped
    assert saved_round(checkpoint) == 3
