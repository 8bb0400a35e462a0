"""Seconds per client-epoch on Fashion-MNIST: FederatedDPStrategy vs a plain PyTorch + Opacus loop.

Both run the seed workload side by side in one process: alice and bob, IID halves of the training set, the seed
CNN, SGD lr 0.1, expected batch 128, noise 1.2, clip 1.0, Poisson sampling, FedAvg after each round. The plain
loop is written like the seed tutorial (a DataLoader per client, Opacus's PrivacyEngine). Prints a table and
saves JSON (default benchmarks/results/seed_round.json).

    python benchmarks/seed_round.py [--rounds 2] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from common import opacus_local_epoch, save_json, timed_fit  # benchmarks/ is on sys.path as a script

from fl_dp_lightning import FederatedDataModule, FederatedDPStrategy, LitClassifier, PrivacyConfig
from fl_dp_lightning.data.sources import load_fashion_mnist, load_synthetic
from fl_dp_lightning.server.aggregate import fedavg

BATCH, LR, NOISE, CLIP, DELTA = 128, 0.1, 1.2, 1.0, 1e-5


def plain_opacus_rounds(clients: dict, init: torch.nn.Module, rounds: int, device: str = "cpu") -> list[float]:
    """The seed's loop: per client a model copy, SGD, PrivacyEngine; FedAvg by hand. Seconds per client-epoch."""
    global_model, seconds = copy.deepcopy(init).to(device), []
    for _ in range(rounds):
        states, sizes = [], []
        for dataset in clients.values():
            state, _, elapsed = opacus_local_epoch(
                global_model, dataset, lr=LR, batch=BATCH, noise=NOISE, clip=CLIP, device=device
            )
            seconds.append(elapsed)
            states.append(state)
            sizes.append(len(dataset))
        global_model.load_state_dict(fedavg(states, sizes))
    return seconds


def strategy_rounds(datamodule: FederatedDataModule, init: torch.nn.Module, rounds: int) -> list[float]:
    """The same workload through Lightning and FederatedDPStrategy. Seconds per client-epoch."""
    strategy = FederatedDPStrategy(privacy=PrivacyConfig(noise_multiplier=NOISE, max_grad_norm=CLIP, delta=DELTA))
    seconds = timed_fit(strategy, LitClassifier(copy.deepcopy(init), lr=LR), datamodule, rounds)
    clients = len(datamodule.client_names)
    return [s / clients for s in seconds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "seed_round.json")
    parser.add_argument("--quick", action="store_true", help="2,000 synthetic images: checks the outputs' form")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    source = load_synthetic(2000, 200) if args.quick else load_fashion_mnist()
    datamodule = FederatedDataModule(
        train=source.train, test=source.test, clients=["alice", "bob"], batch_size=BATCH, seed=0
    )
    datamodule.setup("fit")
    pl.seed_everything(0, verbose=False)
    init = LitClassifier().net

    baseline = plain_opacus_rounds(datamodule.client_datasets, init, args.rounds)
    ours = strategy_rounds(datamodule, init, args.rounds)
    rows = {
        "plain PyTorch + Opacus (seed style)": statistics.median(baseline),
        "FederatedDPStrategy (Lightning)": statistics.median(ours),
    }
    ratio = rows["plain PyTorch + Opacus (seed style)"] / rows["FederatedDPStrategy (Lightning)"]
    print(f"\n{source.origin}, 2 clients x {len(source.train) // 2:,}, batch {BATCH}, {args.rounds} rounds")
    print(f"{'implementation':40s} {'s / client-epoch (median)':>26s}")
    for name, value in rows.items():
        print(f"{name:40s} {value:26.2f}")
    print(f"{'speed-up of the strategy':40s} {ratio:25.2f}x")

    result = {
        "benchmark": "seed_round",
        "data": source.origin,
        "rounds": args.rounds,
        "settings": {"batch_size": BATCH, "lr": LR, "noise_multiplier": NOISE, "max_grad_norm": CLIP},
        "seconds_per_client_epoch": {"plain_opacus": baseline, "strategy": ours},
        "median": rows,
        "speedup_strategy_over_plain": ratio,
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    save_json(args.out, result)


if __name__ == "__main__":
    main()
