"""Opacus's per-sample-gradient modes on the seed CNN: milliseconds per DP-SGD step and peak memory, by batch size.

Modes: ``hooks`` (Opacus's default, what engine=opacus uses), ``functorch`` (vmap of grad inside Opacus) and
``ghost`` (ghost clipping: per-example norms without per-example gradients, then a second backward). Each cell runs
in its own process (so its peak RSS is its own) on random 1x28x28 images, a plain loop with Opacus's PrivacyEngine,
noise 1.2, clip 1.0. Prints a markdown table, saves JSON.

    python benchmarks/grad_sample_modes.py [--batches 64 128 256 512] [--steps 20] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

from common import machine_info, save_json  # benchmarks/ is on sys.path when a benchmark runs as a script

MODES = ("hooks", "functorch", "ghost")


def one_cell(mode: str, batch: int, steps: int) -> dict:
    """Times ``steps`` DP-SGD steps (after two warm-up steps) of the seed CNN at ``batch`` in ``mode``."""
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from fl_dp_lightning.models import seed_cnn

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(batch * (steps + 2), 1, 28, 28), torch.randint(0, 10, (batch * (steps + 2),)))
    model = seed_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(data, batch_size=batch)
    made = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.2,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
        criterion=torch.nn.CrossEntropyLoss(),
        poisson_sampling=False,  # fixed batch sizes: the cells compare like with like
    )
    if mode == "ghost":
        model, optimizer, criterion, loader = made
    else:
        model, optimizer, loader = made
        criterion = torch.nn.CrossEntropyLoss()
    seconds = []
    for x, y in loader:
        start = time.perf_counter()
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    timed = seconds[2:]
    return {
        "mode": mode,
        "batch": batch,
        "ms_per_step": 1000 * sum(timed) / len(timed),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="batch 32, 3 steps: checks the outputs' form")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "grad_sample_modes.json")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: MODE BATCH, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_cell(args.one[0], int(args.one[1]), args.steps)))
        return
    batches, steps = ([32], 3) if args.quick else (args.batches, args.steps)
    rows = []
    for batch in batches:
        for mode in MODES:
            if args.quick:  # in this process: peak memory is then shared, and only the outputs' form is checked
                rows.append(one_cell(mode, batch, steps))
            else:
                command = [sys.executable, __file__, "--one", mode, str(batch), "--steps", str(steps)]
                out = subprocess.run(command, capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    table = ["| batch | " + " | ".join(f"{m} ms / step (peak MB)" for m in MODES) + " |", "|---|" + "---|" * len(MODES)]
    for batch in batches:
        cells = {r["mode"]: r for r in rows if r["batch"] == batch}
        table.append(
            f"| {batch} | "
            + " | ".join(f"{cells[m]['ms_per_step']:.1f} ({cells[m]['peak_rss_mb']:.0f})" for m in MODES)
            + " |"
        )
    print("\n".join(table))
    save_json(args.out, {**machine_info(), "steps": steps, "rows": rows, "table": table})


if __name__ == "__main__":
    main()
