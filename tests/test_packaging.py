"""The package as pip installs it: a wheel with its configs, ``py.typed`` and version, whose app trains from an
empty folder through ``python -m fl_dp_lightning`` and the ``fl-dp-train`` command."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import fl_dp_lightning

ROOT = Path(__file__).resolve().parents[1]
RUN = ["data=synthetic", "trainer.rounds=1", "trainer.progress_bar=false"]


def test_the_installed_package_trains_from_an_empty_folder_with_its_own_configs(tmp_path):
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, str(ROOT), "-w", str(tmp_path / "dist")],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("fl_dp_lightning-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {
        "fl_dp_lightning/py.typed",
        "fl_dp_lightning/conf/config.yaml",
        "fl_dp_lightning/conf/audit/one_run.yaml",
    } <= set(names)
    assert wheel.name.startswith(f"fl_dp_lightning-{fl_dp_lightning.__version__}-")

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(site)}
    empty = tmp_path / "empty"
    empty.mkdir()
    where = subprocess.run(
        [sys.executable, "-c", "import fl_dp_lightning as f; print(f.__file__, f.__version__)"],
        cwd=empty, env=env, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    assert where == [str(site / "fl_dp_lightning" / "__init__.py"), fl_dp_lightning.__version__]

    # one training through python -m (Hydra's run folder under outputs/ here); the console script is the same main
    done = subprocess.run(
        [sys.executable, "-m", "fl_dp_lightning", *RUN], cwd=empty, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (folder,) = (empty / "outputs").glob("*/*")
    results = json.loads((folder / "results.json").read_text())
    assert results["rounds"] == 1 and set(results["epsilon"]) == {"alice", "bob"}
    assert (folder / "train.log").exists() and (folder / "checkpoints" / "last.ckpt").exists()
    script = [str(site / "bin" / "fl-dp-train"), "privacy.noise_multipler=1"]
    bad = subprocess.run(script, cwd=empty, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "did you mean privacy.noise_multiplier?" in bad.stderr.strip().splitlines()[-1]
