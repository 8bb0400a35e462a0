"""Ours against plain PyTorch + Opacus and Flower on the seed workload, each from a fresh process.

The seed workload (alice and bob, IID halves of the training set, the seed CNN, SGD lr 0.1, Poisson batches of
expected size 128, noise 1.2, clip 1.0, delta 1e-5, FedAvg) runs as five implementations, one after the other,
each in its own process so that the end-to-end time includes everything a user waits for (imports, data, start-up):

- ours: ``python train.py`` with ``engine=opacus``, ``engine=vectorized`` and ``privacy=none``;
- the seed tutorial's loop in plain PyTorch + Opacus (a DataLoader and a PrivacyEngine per client, FedAvg by hand);
- Flower's simulation engine (``flwr[simulation]``, Ray) with the same local loop inside a ``ClientApp`` and
  Flower's own ``FedAvg`` in a ``ServerApp``.

Every implementation evaluates the global model on the test set after each round; the reference implementations
count their clients' steps and compute epsilon with the same accountant as ours (PLD, replace-one). Prints a table,
saves JSON, a markdown table and a PNG (default benchmarks/results/frameworks.*).

    python benchmarks/frameworks.py [--rounds 5] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from common import machine_info, opacus_local_epoch, pyplot, save_figure, save_json  # benchmarks/ is on sys.path

from fl_dp_lightning.config import ClientConfig, DataConfig
from fl_dp_lightning.data.datamodule import FederatedDataModule
from fl_dp_lightning.models import seed_cnn
from fl_dp_lightning.privacy.accountants import pld_epsilon
from fl_dp_lightning.runtime.sampling import take_batch
from fl_dp_lightning.server.aggregate import fedavg

ROOT = Path(__file__).resolve().parent.parent
BATCH, LR, NOISE, CLIP, DELTA, SEED = 128, 0.1, 1.2, 1.0, 1e-5, 0
OURS = {  # Hydra overrides of train.py for each of our rows
    "ours, engine=opacus": [],
    "ours, engine=vectorized": ["engine=vectorized"],
    "ours, privacy off": ["privacy=none"],
}
REFERENCES = {"plain PyTorch + Opacus": "plain", "Flower simulation + Opacus": "flower"}


@functools.cache  # once per process: a Flower client process keeps it between rounds, as Flower's examples do
def load_clients(data: str) -> FederatedDataModule:
    """The seed split, built exactly as ``train.py`` builds it (same source, names, shares and seed)."""
    datamodule = FederatedDataModule.from_config(DataConfig(name=data), ClientConfig(), batch_size=BATCH, seed=SEED)
    datamodule.setup("fit")
    return datamodule


def initial_model() -> torch.nn.Module:
    """The seed CNN as ``train.py`` initialises it (``seed_everything(0)`` then the module's network)."""
    torch.manual_seed(SEED)
    return seed_cnn()


def accuracy(model: torch.nn.Module, dataset) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (the data module's test records, which ``trainer.test`` reads)."""
    x, y = take_batch(dataset, list(range(len(dataset))))
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def opacus_sampling(size: int) -> tuple[int, float]:
    """Steps per epoch and sample rate of Opacus's Poisson loader over ``size`` records at ``BATCH``: it keeps the
    DataLoader's length and samples each record with probability 1 / length."""
    steps = math.ceil(size / BATCH)
    return steps, 1 / steps


def round_row(round_: int, start: float, model: torch.nn.Module, test, size: int) -> dict:
    """A reference implementation's round, as a row of ``train.py``'s ``history``: seconds since ``start``
    (training and evaluation), test accuracy, and epsilon after ``round_`` local epochs over ``size`` records
    from our accountant's math (PLD, replace-one)."""
    acc = accuracy(model, test)
    steps, rate = opacus_sampling(size)
    epsilon = pld_epsilon([(NOISE, rate, steps * round_)], DELTA)
    return {"round": round_, "seconds": time.perf_counter() - start, "val/acc": acc, "epsilon_max": epsilon}


def plain_worker(data: str, rounds: int) -> list[dict]:
    """The seed tutorial's loop in plain PyTorch + Opacus: per round each client trains a copy, then FedAvg."""
    datamodule = load_clients(data)
    clients, model = datamodule.client_datasets, initial_model()
    history = []
    for round_ in range(1, rounds + 1):
        start, states, sizes = time.perf_counter(), [], []
        for dataset in clients.values():
            state, _, _ = opacus_local_epoch(model, dataset, lr=LR, batch=BATCH, noise=NOISE, clip=CLIP)
            states.append(state)
            sizes.append(len(dataset))
        model.load_state_dict(fedavg(states, sizes))
        history.append(round_row(round_, start, model, datamodule.test_set, min(sizes)))
    return history


def flower_worker(data: str, rounds: int) -> list[dict]:
    """The same local loop on Flower's simulation engine (default resources): the ``ClientApp`` of
    ``flower_app.py`` on two SuperNodes, Flower's ``FedAvg`` in a ``ServerApp`` evaluating after each round."""
    from flower_app import app as client_app
    from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
    from flwr.simulation import run_simulation

    server_app, history, replies = ServerApp(), [], []

    def count_replies(records: list[RecordDict], weighting_key: str) -> MetricRecord:
        replies.append(len(records))  # Flower logs a failed client and goes on: a round short of one is an error here
        return aggregate_metricrecords(records, weighting_key)

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        test, model = load_clients(data).test_set, initial_model()
        size = min(load_clients(data).client_sizes().values())
        start = [time.perf_counter()]

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            if server_round:  # round 0 is the initial model; Flower calls this after each round's aggregation
                history.append(round_row(server_round, start[0], model, test, size))
            start[0] = time.perf_counter()
            return MetricRecord({"accuracy": history[-1]["val/acc"] if history else 0.0})

        strategy = FedAvg(fraction_evaluate=0.0, train_metrics_aggr_fn=count_replies)
        initial = ArrayRecord(model.state_dict())
        config = ConfigRecord({"data": data})
        strategy.start(grid, initial, num_rounds=rounds, train_config=config, evaluate_fn=evaluate)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=2)
    if replies != [2] * rounds:
        raise RuntimeError(f"Flower's clients failed: replies per round {replies} (see the log above)")
    return history


def run_process(command: list[str], out: Path) -> dict:
    """Runs ``command`` in a fresh process; its end-to-end seconds and the per-round history it wrote to ``out``.

    benchmarks/ goes on the PYTHONPATH, which the Flower simulation's worker processes inherit.
    """
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return {"end_to_end_seconds": seconds, "history": json.loads(out.read_text())["history"]}


def train_py(data: str, rounds: int, overrides: list[str], run_dir: Path) -> dict:
    """``python train.py`` with ``overrides`` in a fresh process: its end-to-end seconds and per-round history."""
    command = [sys.executable, "train.py", f"data={data}", f"trainer.rounds={rounds}", "trainer.progress_bar=false"]
    return run_process([*command, *overrides, f"hydra.run.dir={run_dir}"], run_dir / "results.json")


def measure(data: str, rounds: int) -> dict[str, dict]:
    """Every implementation, one after the other, each in its own process."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in OURS.items():
            results[name] = train_py(data, rounds, overrides, Path(tmp) / f"ours{len(results)}")
            print(f"{name}: {results[name]['end_to_end_seconds']:.1f} s end to end")
        for name, worker in REFERENCES.items():
            out = Path(tmp) / f"{worker}.json"
            command = [sys.executable, __file__, "--worker", worker, "--data", data, "--rounds", str(rounds)]
            results[name] = run_process([*command, "--out", str(out)], out)
            print(f"{name}: {results[name]['end_to_end_seconds']:.1f} s end to end")
    return results


def table(results: dict[str, dict], rounds: int) -> str:
    """The markdown table: end-to-end and steady seconds, ratios to ours, accuracy and epsilon after the last round."""
    ours = results["ours, engine=opacus"]
    lines = [
        f"| implementation ({rounds} rounds) | end to end s | x ours | s / round (median after round 1) | x ours "
        "| accuracy | ε |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        last, wall = result["history"][-1], result["end_to_end_seconds"]
        steady, ours_steady = steady_seconds(result), steady_seconds(ours)
        epsilon = "-" if last["epsilon_max"] is None else f"{last['epsilon_max']:.2f}"
        lines.append(
            f"| {name} | {wall:.1f} | {wall / ours['end_to_end_seconds']:.2f} "
            f"| {steady:.2f} | {steady / ours_steady:.2f} | {100 * last['val/acc']:.1f} % | {epsilon} |"
        )
    return "\n".join(lines)


def steady_seconds(result: dict) -> float:
    """Median seconds per round after the first (which carries warm-up), or the only round's."""
    seconds = [row["seconds"] for row in result["history"]]
    return statistics.median(seconds[1:] or seconds)


def plot(results: dict[str, dict], path: Path) -> None:
    """Test accuracy and epsilon against the round, and end-to-end seconds, for every implementation."""
    plt = pyplot()
    if plt is None:
        return
    fig, (acc, eps, wall) = plt.subplots(1, 3, figsize=(15, 4))
    for color, (name, result) in enumerate(results.items()):
        rounds, style = (
            [row["round"] for row in result["history"]],
            {"marker": "o", "label": name, "color": f"C{color}"},
        )
        acc.plot(rounds, [100 * row["val/acc"] for row in result["history"]], **style)
        if result["history"][-1]["epsilon_max"] is not None:
            eps.plot(rounds, [row["epsilon_max"] for row in result["history"]], **style)
    names = list(results)
    wall.barh(names, [results[n]["end_to_end_seconds"] for n in names])
    acc.set(xlabel="round", ylabel="test accuracy (%)", title="accuracy per round")
    eps.set(xlabel="round", ylabel=f"ε (δ = {DELTA:g})", title="ε per client per round")
    wall.set(xlabel="seconds, process start to exit", title="end to end")
    acc.legend(fontsize=7)
    eps.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="synthetic data, 2 rounds: checks the outputs' form")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "frameworks.json")
    parser.add_argument("--worker", choices=sorted(REFERENCES.values()), help=argparse.SUPPRESS)
    parser.add_argument("--data", default="fashion_mnist", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.worker:
        worker = plain_worker if args.worker == "plain" else flower_worker
        save_json(args.out, {"history": worker(args.data, args.rounds)})
        return

    data, rounds = ("synthetic", 2) if args.quick else ("fashion_mnist", args.rounds)
    results = measure(data, rounds)
    markdown = table(results, rounds)
    print(markdown)
    settings = {"batch_size": BATCH, "lr": LR, "noise_multiplier": NOISE, "max_grad_norm": CLIP, "delta": DELTA}
    payload = {"benchmark": "frameworks", "data": data, "rounds": rounds, "settings": settings}
    save_json(args.out, payload | {"results": results, "machine": machine_info() | flower_version()})
    args.out.with_suffix(".md").write_text(markdown + "\n")
    plot(results, args.out.with_suffix(".png"))


def flower_version() -> dict[str, str]:
    """The Flower version the comparison ran against."""
    from importlib.metadata import version

    return {"flwr": version("flwr")}


if __name__ == "__main__":
    main()
