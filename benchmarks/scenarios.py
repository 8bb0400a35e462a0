"""Test accuracy after a fixed number of rounds, at the same target epsilon, for non-IID partitions under FedAvg,
FedProx and FedAdam: Fashion-MNIST (Debian's package; synthetic data with --quick), 10 clients, the seed CNN.

Each cell is one `train.py` run composed from the same Hydra config (noise calibrated per client so every client
ends at the target epsilon). Prints a markdown table, saves JSON and, with matplotlib, a PNG.

    python benchmarks/scenarios.py [--rounds 5] [--epsilon 3] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

from common import (  # benchmarks/ is on sys.path when a benchmark runs as a script
    machine_info,
    pyplot,
    save_figure,
    save_json,
)

PARTITIONS = {
    "IID": ["client.partition=iid"],
    "Dirichlet 1.0": ["client.partition=dirichlet", "client.dirichlet_alpha=1.0"],
    "Dirichlet 0.1": ["client.partition=dirichlet", "client.dirichlet_alpha=0.1"],
    "2-label shards": ["client.partition=shards", "client.shards_per_client=2"],
}
ALGORITHMS = {
    "FedAvg": [],
    "FedProx (mu 0.01)": ["client.proximal_mu=0.01"],
    "FedAdam (lr 0.01)": ["server=fedadam", "server.lr=0.01"],
}


def main() -> None:

    from fl_dp_lightning.cli import compose_overrides, run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="synthetic data, 1 round: checks the outputs' form")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scenarios.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    data = ["data=synthetic", "data.synthetic_train_size=4000"] if args.quick else ["data=fashion_mnist"]
    rounds = 1 if args.quick else args.rounds
    common = [
        *data,
        "client.count=10",
        "client.names=[]",
        f"trainer.rounds={rounds}",
        "trainer.batch_size=64",
        f"privacy.target_epsilon={args.epsilon}",
        "trainer.progress_bar=false",
    ]
    cells = []
    for partition, p_args in PARTITIONS.items():
        for algorithm, a_args in ALGORITHMS.items():
            start = time.perf_counter()
            with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as run_dir:
                results = run(compose_overrides([*common, *p_args, *a_args]), run_dir)
            cells.append(
                {
                    "partition": partition,
                    "algorithm": algorithm,
                    "test_acc": results["test"]["test/acc"],
                    "epsilon_max": max(results["epsilon"].values()),
                    "seconds": time.perf_counter() - start,
                    "data_origin": results["data_origin"],
                }
            )
            print(f"{partition:>15} {algorithm:>18}  acc {cells[-1]['test_acc']:.4f}", flush=True)
    table = ["| partition | " + " | ".join(ALGORITHMS) + " |", "|---|" + "---|" * len(ALGORITHMS)]
    for partition in PARTITIONS:
        row = [f"{c['test_acc'] * 100:.1f} %" for c in cells if c["partition"] == partition]
        table.append(f"| {partition} | " + " | ".join(row) + " |")
    print("\n".join(table))
    settings = {"rounds": rounds, "target_epsilon": args.epsilon, "clients": 10, "batch_size": 64, "delta": 1e-5}
    save_json(args.out, {**machine_info(), "settings": settings, "cells": cells, "table": table})
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(ALGORITHMS)
    for i, algorithm in enumerate(ALGORITHMS):
        accs = [c["test_acc"] for c in cells if c["algorithm"] == algorithm]
        ax.bar([x + i * width for x in range(len(PARTITIONS))], accs, width, label=algorithm)
    ax.set_xticks([x + width for x in range(len(PARTITIONS))], list(PARTITIONS))
    ax.set_ylabel(f"test accuracy after {rounds} rounds")
    ax.set_title(f"10 clients, epsilon {args.epsilon} per client (delta 1e-5)")
    ax.legend()
    save_figure(fig, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
