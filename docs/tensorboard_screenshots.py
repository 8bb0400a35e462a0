"""The docs' TensorBoard screenshots, taken from real runs: ``make tb-screenshots``.

Trains two short runs on synthetic data (record-level DP; no DP with a Dirichlet partition, whose class counts
are released), serves them with TensorBoard and renders its CUSTOM SCALARS (unsmoothed), HPARAMS, TEXT and
IMAGES tabs in headless Chromium into ``docs/images/tensorboard-<tab>.png``. Needs Chromium
(``apt-get install chromium-headless-shell``, or ``chromium``/``google-chrome`` on the PATH).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image, ImageStat

RUNS = {
    "dp": ["data=synthetic", "trainer.rounds=3"],
    "no_dp": ["data=synthetic", "trainer.rounds=3", "privacy=none", "client.partition=dirichlet", "client.count=4"],
}
TABS = {
    "custom-scalars": "custom_scalars&_smoothingWeight=0",
    "hparams": "hparams",
    "text": "text",
    "images": "images",
}
"""Screenshot name -> TensorBoard's URL fragment."""
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "chrome")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(folder: Path) -> None:
    for name, overrides in RUNS.items():
        command = [sys.executable, "-m", "fl_dp_lightning", *overrides, "trainer.progress_bar=false"]
        subprocess.run([*command, f"hydra.run.dir={folder / name}"], check=True, capture_output=True, timeout=900)


def serve(folder: Path, port: int) -> subprocess.Popen:
    board = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(folder), "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=1)
            return board
        except OSError:
            time.sleep(0.5)
    board.kill()
    raise SystemExit("error: TensorBoard did not start within 60 s")


def screenshot(browser: str, url: str, path: Path) -> None:
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1400,1000",
            "--virtual-time-budget=20000",  # the page's scripts run until the charts are drawn
            f"--screenshot={path}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    spread = ImageStat.Stat(Image.open(path).convert("L")).stddev[0]
    if spread < 5:
        raise SystemExit(f"error: {path} came out blank (pixel spread {spread:.1f}); rerun, or raise the time budget")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "images", help="folder of the PNGs")
    args = parser.parse_args(argv)
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        raise SystemExit("error: no Chromium found; apt-get install chromium-headless-shell (or put chromium on PATH)")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        train(runs)
        port = free_port()
        board = serve(runs, port)
        try:
            for name, fragment in TABS.items():
                path = args.out / f"tensorboard-{name}.png"
                screenshot(browser, f"http://127.0.0.1:{port}/#{fragment}", path)
                print(f"saved {path}")
        finally:
            board.kill()


if __name__ == "__main__":
    main()
