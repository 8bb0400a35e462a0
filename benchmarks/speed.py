"""Speed of both client engines against plain Opacus loops, on one device, side by side in one run.

The seed workload (alice and bob, IID halves of Fashion-MNIST, the seed CNN, SGD lr 0.1, expected batch 128,
noise 1.2, clip 1.0, Poisson sampling, FedAvg) through:

- the seed's loop as its readers write it: torchvision's FashionMNIST with ToTensor + Normalize, a DataLoader per
  client, Opacus's PrivacyEngine;
- the hand-written tensor loop of benchmarks/seed_round.py (tensors in a DataLoader, PrivacyEngine);
- FederatedDPStrategy with engine=opacus (also with engine.memory_format=preserve: the contiguous layout it had
  before channels-last), with engine=vectorized (Opacus's per-layer rules on CPU cores; also with
  engine.per_example=vmap), and with privacy off (engine=opacus);

then the engines at 10, 100 and 1,000 clients of 60 synthetic examples (expected batch 30, 2 steps per client):
engine=opacus in the contiguous layout (the per-client path before), engine=opacus, engine=vectorized;
a profile of one Opacus-engine round (top operators); and the validation accuracy of both engines after
``--accuracy-rounds`` rounds. Seconds per client-epoch are the median over rounds after a first warm-up round.
Prints markdown tables and saves JSON and a PNG (default benchmarks/results/speed.*), with the device's name.

    python benchmarks/speed.py [--device cpu|cuda] [--rounds 3] [--clients 10 100 1000] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import gzip
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from common import pyplot, quiet_trainer, save_figure, save_json, synchronize
from lightning.pytorch.callbacks import Callback
from opacus import PrivacyEngine
from seed_round import BATCH, CLIP, LR, NOISE, plain_opacus_rounds  # benchmarks/ is on sys.path as a script
from torch.utils.data import DataLoader, Subset, TensorDataset

from fl_dp_lightning import FederatedDataModule, FederatedDPStrategy, LitClassifier, PrivacyConfig
from fl_dp_lightning.config import EngineConfig
from fl_dp_lightning.data.sources import (
    DEBIAN_FASHION_MNIST,
    FASHION_MNIST_MEAN_STD,
    DataSource,
    load_fashion_mnist,
    load_synthetic,
)
from fl_dp_lightning.server.aggregate import fedavg

SCALE_EXAMPLES, SCALE_BATCH = 60, 30
BEFORE = EngineConfig(memory_format="preserve")
"""engine=opacus in the module's own (contiguous) layout: the per-client path before channels-last."""
VMAP = EngineConfig(name="vectorized", per_example="vmap")
SCALE_ENGINES = {"opacus_before": BEFORE, "opacus": EngineConfig(), "vectorized": EngineConfig(name="vectorized")}


def strategy_seconds(datamodule, init, device, rounds, engine="opacus", privacy=True) -> list[float]:
    """Seconds of each round's training through FederatedDPStrategy."""
    config = PrivacyConfig(noise_multiplier=NOISE, max_grad_norm=CLIP) if privacy else PrivacyConfig(enabled=False)
    engine = engine if isinstance(engine, EngineConfig) else EngineConfig(name=engine)
    strategy = FederatedDPStrategy(privacy=config, engine=engine, log_rounds=False)
    fit = quiet_trainer(strategy, rounds, device=device)
    fit.fit(LitClassifier(copy.deepcopy(init), lr=LR), datamodule)
    return fit.callbacks[0].seconds


def torchvision_seed_loop(init, device, rounds, records: int | None) -> list[float]:
    """The seed tutorial's loop over torchvision's FashionMNIST (decoded and transformed per record), IID halves
    (``records`` each when given). Seconds per client-epoch."""
    from torchvision import datasets, transforms

    root = Path(tempfile.mkdtemp(prefix="fmnist_"))
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        with gzip.open(DEBIAN_FASHION_MNIST / f"{name}.gz") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(*FASHION_MNIST_MEAN_STD)])
    train = datasets.FashionMNIST(str(root), train=True, transform=transform)
    halves = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).chunk(2)
    clients = [Subset(train, half[:records].tolist()) for half in halves]
    global_model, seconds = copy.deepcopy(init).to(device), []
    for _ in range(rounds):
        states = []
        for dataset in clients:
            model = copy.deepcopy(global_model)
            optimizer = torch.optim.SGD(model.parameters(), lr=LR)
            loader = DataLoader(dataset, batch_size=BATCH)
            model, optimizer, loader = PrivacyEngine().make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=NOISE, max_grad_norm=CLIP
            )
            start = time.perf_counter()
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
            synchronize(device)
            seconds.append(time.perf_counter() - start)
            states.append(model._module.state_dict())
        global_model.load_state_dict(fedavg(states, [len(c) for c in clients]))
    shutil.rmtree(root)
    return seconds


class ProfileRound(Callback):
    """Profiles the second round's training (the first warms up) and keeps the top operators by self CPU time."""

    def __init__(self, device: str) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        self.profiler = profile(activities=activities)
        self.top: list[dict] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            self.profiler.__enter__()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != 1:
            return
        self.profiler.__exit__(None, None, None)
        events = self.profiler.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        self.top = [
            {
                "op": e.key,
                "self_cpu_s": e.self_cpu_time_total / 1e6,
                "share": e.self_cpu_time_total / total,
                "calls": e.count,
            }
            for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        ]


def profile_round(datamodule, init, device) -> list[dict]:
    """The top operators of one engine=opacus round of the seed workload."""
    profiler = ProfileRound(device)
    strategy = FederatedDPStrategy(privacy=PrivacyConfig(noise_multiplier=NOISE), log_rounds=False)
    fit = quiet_trainer(strategy, 2, device=device)
    fit.callbacks.append(profiler)
    fit.fit(LitClassifier(copy.deepcopy(init), lr=LR), datamodule)
    return profiler.top


def accuracy_after(datamodule, init, device, rounds, engine) -> float:
    strategy = FederatedDPStrategy(privacy=PrivacyConfig(noise_multiplier=NOISE), engine=engine, log_rounds=False)
    fit = quiet_trainer(strategy, rounds, device=device, validate=True)
    module = LitClassifier(copy.deepcopy(init), lr=LR)
    fit.fit(module, datamodule)
    return float(fit.callback_metrics["val/acc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per timed path (the first is a warm-up)")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--accuracy-rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="add the vectorized engine with engine.compile")
    parser.add_argument("--quick", action="store_true", help="2,000 records per seed client, 2 rounds, small scale")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "speed.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.quick:
        args.rounds, args.clients, args.accuracy_rounds = 2, [4, 8], 1

    source = load_fashion_mnist()
    if args.quick:
        first = [TensorDataset(*(t[:4000] for t in d.tensors)) for d in (source.train, source.test)]
        source = DataSource(*first, source.origin + " (first 4,000 records of each split)")
    datamodule = FederatedDataModule(train=source.train, test=source.test, clients=["alice", "bob"], batch_size=BATCH)
    datamodule.setup("fit")
    pl.seed_everything(0, verbose=False)
    init = LitClassifier().net
    records = len(datamodule.client_datasets["alice"]) if args.quick else None

    def ours(**kwargs) -> list[float]:  # seconds per client-epoch of each round
        return [s / clients for s in strategy_seconds(datamodule, init, args.device, args.rounds, **kwargs)]

    clients = len(datamodule.client_names)
    seed_paths = {  # each gives seconds per client-epoch, round by round
        "seed loop: torchvision FashionMNIST + DataLoader + PrivacyEngine": lambda: torchvision_seed_loop(
            init, args.device, args.rounds, records
        ),
        "hand-written tensor loop + PrivacyEngine (seed_round.py)": lambda: plain_opacus_rounds(
            datamodule.client_datasets, init, args.rounds, device=args.device
        ),
        "FederatedDPStrategy, engine=opacus": lambda: ours(),
        "FederatedDPStrategy, engine=opacus, memory_format=preserve": lambda: ours(engine=BEFORE),
        "FederatedDPStrategy, engine=vectorized": lambda: ours(engine="vectorized"),
        "FederatedDPStrategy, engine=vectorized, per_example=vmap": lambda: ours(engine=VMAP),
        "FederatedDPStrategy, privacy off": lambda: ours(privacy=False),
    }
    if args.compile:
        compiled = EngineConfig(name="vectorized", compile=True)
        seed_paths["FederatedDPStrategy, engine=vectorized, compiled"] = lambda: ours(engine=compiled)
    seed = {}
    for name, measure in seed_paths.items():
        seconds = measure()
        warm = seconds[len(seconds) // args.rounds :]  # the first round warms up (and compiles)
        seed[name] = {"seconds": seconds, "median_s_per_client_epoch": statistics.median(warm)}
        print(f"{name}: {seed[name]['median_s_per_client_epoch']:.3f} s per client-epoch", flush=True)

    scale = []
    for count in args.clients:
        synthetic = load_synthetic(train_size=count * SCALE_EXAMPLES, test_size=100, seed=0)
        many = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=count, batch_size=SCALE_BATCH)
        many.setup("fit")
        row = {"clients": count}
        for key, engine in SCALE_ENGINES.items():
            row[key] = strategy_seconds(many, init, args.device, 2, engine)[-1]
        row["vectorized_speedup"] = row["opacus"] / row["vectorized"]
        row["vectorized_speedup_over_before"] = row["opacus_before"] / row["vectorized"]
        scale.append(row)
        print(", ".join(f"{count} clients: {k} {row[k]:.2f} s per round" for k in SCALE_ENGINES), flush=True)

    profile = profile_round(datamodule, init, args.device)
    accuracy = {
        e: accuracy_after(datamodule, init, args.device, args.accuracy_rounds, e) for e in ("opacus", "vectorized")
    }
    report(args, source.origin, seed, scale, profile, accuracy)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def report(args, origin: str, seed: dict, scale: list, profile: list, accuracy: dict) -> None:
    name = device_name(args.device)
    plain = seed["hand-written tensor loop + PrivacyEngine (seed_round.py)"]["median_s_per_client_epoch"]
    torchvision_loop = seed["seed loop: torchvision FashionMNIST + DataLoader + PrivacyEngine"][
        "median_s_per_client_epoch"
    ]
    no_dp = seed["FederatedDPStrategy, privacy off"]["median_s_per_client_epoch"]
    lines = [
        f"Device: {name}; torch {torch.__version__}; {origin}; seed workload, median of rounds 2-{args.rounds}",
        "",
        "| path | s per client-epoch | x seed loop | x tensor loop | x our no-DP |",
        "|---|---|---|---|---|",
    ]
    for path, row in seed.items():
        s = row["median_s_per_client_epoch"]
        lines.append(f"| {path} | {s:.2f} | {s / torchvision_loop:.2f} | {s / plain:.2f} | {s / no_dp:.2f} |")
    lines += [
        "",
        "| clients | engine=opacus, contiguous (before) s/round | engine=opacus s/round | engine=vectorized s/round "
        "| vectorized vs before | vectorized vs opacus |",
        "|---|---|---|---|---|---|",
    ]
    for row in scale:
        lines.append(
            f"| {row['clients']} | {row['opacus_before']:.2f} | {row['opacus']:.2f} | {row['vectorized']:.2f} "
            f"| {row['vectorized_speedup_over_before']:.2f}x | {row['vectorized_speedup']:.2f}x |"
        )
    lines += [
        "",
        f"Validation accuracy after {args.accuracy_rounds} rounds: "
        + ", ".join(f"{e} {a:.4f}" for e, a in accuracy.items()),
        "",
        "Profile of one engine=opacus round (self CPU time):",
        "",
        "| operator | s | share | calls |",
        "|---|---|---|---|",
    ]
    lines += [f"| {p['op']} | {p['self_cpu_s']:.3f} | {p['share']:.1%} | {p['calls']} |" for p in profile]
    table = "\n".join(lines)
    print("\n" + table)
    result = {
        "benchmark": "speed",
        "device": args.device,
        "device_name": name,
        "torch": torch.__version__,
        "data": origin,
        "rounds": args.rounds,
        "settings": {"batch_size": BATCH, "lr": LR, "noise_multiplier": NOISE, "max_grad_norm": CLIP},
        "seed_workload": seed,
        "scale": {"examples_per_client": SCALE_EXAMPLES, "batch_size": SCALE_BATCH, "rows": scale},
        "accuracy": {"rounds": args.accuracy_rounds, **accuracy},
        "profile_opacus_round": profile,
    }
    save_json(args.out, result)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(f"saved {args.out.with_suffix('.md')}")
    plot(args.out.with_suffix(".png"), name, seed, scale)


def plot(path: Path, name: str, seed: dict, scale: list) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [p.replace("FederatedDPStrategy, ", "").replace(" + PrivacyEngine", "") for p in seed]
    left.barh(labels, [r["median_s_per_client_epoch"] for r in seed.values()])
    left.set(xlabel="seconds per client-epoch", title="seed workload")
    counts = [r["clients"] for r in scale]
    for key in SCALE_ENGINES:
        right.loglog(counts, [r[key] for r in scale], "o-", label=key)
    right.set(xlabel="clients", ylabel="seconds per round", title="2 steps per client")
    right.legend()
    fig.suptitle(name)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
