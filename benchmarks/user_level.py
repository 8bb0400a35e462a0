"""Test accuracy under user-level DP (DP-FedAvg) at several user-level epsilons, and without DP: Fashion-MNIST
(Debian's package; synthetic data with --quick), 100 clients with a Dirichlet(0.5) label split, the seed CNN.

Each cell is one `train.py` run composed from the same Hydra config: record-level DP off (`privacy=none`), the
server's noise calibrated to the user-level target over all rounds (`user_privacy.target_epsilon`), every client in
every round. Prints a markdown table, saves JSON and, with matplotlib, a PNG.

    python benchmarks/user_level.py [--rounds 20] [--epsilons 1 3 8] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:

    from fl_dp_lightning.cli import compose_overrides, run
    from fl_dp_lightning.config import ConfigError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--clip", type=float, default=0.1, help="the clip norm of a client's update")
    parser.add_argument("--adaptive", action="store_true", help="adaptive clipping, starting from --clip")
    parser.add_argument("--quick", action="store_true", help="synthetic data, 20 clients, 2 rounds: the outputs' form")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "user_level.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    data = ["data=synthetic", "data.synthetic_train_size=4000"] if args.quick else ["data=fashion_mnist"]
    clients, rounds = (20, 2) if args.quick else (100, args.rounds)
    common = [
        *data,
        f"client.count={clients}",
        "client.names=[]",
        "client.partition=dirichlet",
        "client.dirichlet_alpha=0.5",
        "client.drop_small=true",
        "privacy=none",
        f"trainer.rounds={rounds}",
        "trainer.batch_size=16",
        "trainer.progress_bar=false",
    ]
    cells = []
    for epsilon in [*args.epsilons, None]:
        user = (
            [
                f"user_privacy={'adaptive' if args.adaptive else 'dpfedavg'}",
                f"user_privacy.target_epsilon={epsilon}",
                f"user_privacy.clip={args.clip}",
            ]
            if epsilon is not None
            else []
        )
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as run_dir:
            try:
                results = run(compose_overrides([*common, *user]), run_dir)
            except ConfigError as err:  # the noised model diverged: a result of this cell, not of the benchmark
                cells.append({"target_epsilon": epsilon, "diverged": str(err), "test_acc": None})
                print(f"epsilon {epsilon}: {err}", flush=True)
                continue
            report = json.loads((Path(run_dir) / "privacy_report.json").read_text())
        cells.append(
            {
                "target_epsilon": epsilon,
                "user_epsilon": results["user_epsilon"],
                "noise_multiplier": None if report["user_level"] is None else report["user_level"]["noise_multiplier"],
                "clip": None if report["user_level"] is None else report["user_level"]["clip"],
                "clients": len(report["clients"]),
                "test_acc": results["test"]["test/acc"],
                "seconds": time.perf_counter() - start,
                "data_origin": results["data_origin"],
            }
        )
        label = "no DP" if epsilon is None else f"user-level epsilon {epsilon:g}"
        print(f"{label:>24}  acc {cells[-1]['test_acc']:.4f}", flush=True)
    table = [
        "| user-level epsilon (delta 1e-5) | server noise multiplier | test accuracy |",
        "|---|---|---|",
    ]
    for c in cells:
        if c["test_acc"] is None:
            table.append(f"| {c['target_epsilon']:g} | - | diverged |")
            continue
        label = "no DP" if c["target_epsilon"] is None else f"{c['user_epsilon']:.2f}"
        noise = "-" if c["noise_multiplier"] is None else f"{c['noise_multiplier']:.3f}"
        table.append(f"| {label} | {noise} | {c['test_acc'] * 100:.1f} % |")
    print("\n".join(table))
    settings = {"rounds": rounds, "clients": clients, "clip": args.clip, "adaptive_clipping": args.adaptive}
    settings.update({"batch_size": 16, "partition": "dirichlet 0.5"})
    save_json(args.out, {**machine_info(), "settings": settings, "cells": cells, "table": table})
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    private = [c for c in cells if c["target_epsilon"] is not None and c["test_acc"] is not None]
    ax.semilogx([c["user_epsilon"] for c in private], [c["test_acc"] for c in private], "o-", label="DP-FedAvg")
    ax.axhline(cells[-1]["test_acc"], linestyle="--", color="gray", label="no DP")
    ax.set(xlabel="user-level epsilon", ylabel=f"test accuracy after {rounds} rounds", title=f"{clients} clients")
    ax.legend()
    save_figure(fig, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
