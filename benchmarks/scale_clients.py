"""Seconds per round and peak memory against the number of clients (one process), seed CNN, DP-SGD.

Each client holds 60 synthetic 1x28x28 examples; expected batch 30 (2 steps per client per round). Each client
count runs in its own process so that peak memory (ru_maxrss) is its own. Prints a table, saves JSON and, when
matplotlib is installed, a PNG plot next to it.

    python benchmarks/scale_clients.py [--clients 2 10 100 1000] [--rounds 2] [--out PATH]
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

from common import pyplot, save_figure, save_json  # benchmarks/ is on sys.path when a benchmark runs as a script

EXAMPLES_PER_CLIENT, BATCH = 60, 30


def one_run(clients: int, rounds: int, processes: int = 1) -> dict:
    """Trains ``rounds`` rounds with ``clients`` clients in ``processes`` processes; returns timings and memory."""
    import lightning.pytorch as pl
    import torch
    from common import timed_fit  # benchmarks/ is on sys.path when run as a script

    from fl_dp_lightning import DistributedFederatedDPStrategy, FederatedDataModule, FederatedDPStrategy, LitClassifier
    from fl_dp_lightning.data.sources import load_synthetic

    warnings.filterwarnings("ignore")
    source = load_synthetic(train_size=clients * EXAMPLES_PER_CLIENT, test_size=200, seed=0)
    datamodule = FederatedDataModule(train=source.train, test=source.test, clients=clients, batch_size=BATCH)
    datamodule.setup("fit")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pl.seed_everything(0, verbose=False)
    if processes == 1:
        strategy = FederatedDPStrategy()
    else:
        strategy = DistributedFederatedDPStrategy(start_method="spawn", process_group_backend="gloo")
    seconds = timed_fit(strategy, LitClassifier(), datamodule, rounds, devices=processes)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    data_mb = sum(t.numel() * t.element_size() for t in source.train.tensors) / 2**20
    return {
        "clients": clients,
        "processes": processes,
        "seconds_per_round": seconds,
        "steps_per_round": 2 * clients,  # 60 examples, expected batch 30: int(1 / 0.5) steps each
        "peak_rss_mb": rss_after / 1024,
        "rss_growth_during_training_mb": (rss_after - rss_before) / 1024,
        "training_data_mb": data_mb,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--processes", type=int, nargs="+", default=[1, 2], help="process counts, at the largest client count"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale_clients.json")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one count, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one, args.rounds, args.processes[0])))
        return

    def measure(clients: int, processes: int) -> dict:
        start = time.perf_counter()
        command = [sys.executable, __file__, "--one", str(clients), "--rounds", str(args.rounds)]
        out = subprocess.run([*command, "--processes", str(processes)], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["wall_seconds"] = time.perf_counter() - start
        return row

    rows = [measure(clients, 1) for clients in args.clients]
    by_processes = [measure(args.clients[-1], processes) for processes in args.processes]
    print(
        f"{'clients':>8} {'steps/round':>12} {'s/round (last)':>15} {'ms/step':>8} "
        f"{'peak RSS MB':>12} {'RSS growth MB':>14}"
    )
    for r in rows:
        last = r["seconds_per_round"][-1]
        print(
            f"{r['clients']:8d} {r['steps_per_round']:12d} {last:15.2f} {1000 * last / r['steps_per_round']:8.2f} "
            f"{r['peak_rss_mb']:12.0f} {r['rss_growth_during_training_mb']:14.1f}"
        )
    print(f"\n{args.clients[-1]} clients by processes (more than one: whole fit timed, process start-up included)")
    print(f"{'processes':>9} {'s/round':>8}")
    for r in by_processes:
        print(f"{r['processes']:9d} {r['seconds_per_round'][-1]:8.2f}")
    result = {
        "benchmark": "scale_clients",
        "examples_per_client": EXAMPLES_PER_CLIENT,
        "batch_size": BATCH,
        "rounds": args.rounds,
        "rows": rows,
        "by_processes_at_largest_client_count": by_processes,
    }
    save_json(args.out, result)
    plt = pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    counts = [r["clients"] for r in rows]
    left.loglog(counts, [r["seconds_per_round"][-1] for r in rows], "o-")
    left.set(xlabel="clients", ylabel="seconds per round", title="time (2 steps per client)")
    right.semilogx(counts, [r["peak_rss_mb"] for r in rows], "o-")
    right.set(xlabel="clients", ylabel="peak RSS (MB)", title="memory")
    save_figure(fig, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
