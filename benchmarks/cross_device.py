"""Cross-device scale: seconds per round and peak memory of the vectorized engine at 1,000 / 10,000 / 100,000
clients with 1 % and 10 % of them sampled per round, under user-level DP-FedAvg.

Each cell is one ``train.py`` configuration run in its own process (peak memory, ru_maxrss, is then its own):
synthetic 1x28x28 records, 10 per client, the seed CNN, Poisson client sampling, record-level DP off, user-level
DP-FedAvg (noise 1.0, clip 0.3), the vectorized engine, ``--rounds`` rounds; seconds per round are the median
after the first round. Memory per client is the slope of peak memory between client counts at the same sampling
fraction, less the 31 KB of training records each client holds: what the engine keeps per client, which must not
grow with the model (no model copy per client between rounds). Prints a table, saves JSON (a list of rows) and
markdown (default benchmarks/results/cross_device.*).

    python benchmarks/cross_device.py [--clients 1000 10000 100000] [--fractions 0.01 0.1] [--rounds 3] [--quick]

``--accuracy 1 3`` instead trains the cross-device recipe (``+experiment=cross_device_fmnist``, DP-FedAvg) and its
DP-FTRL twin (``+experiment=cross_device_fmnist_ftrl``) at each user-level target epsilon, each a ``train.py``
process whose run folder is kept under ``--runs`` (a finished point is read back, not trained again), and adds
one row per point (``mechanism``, ``user_epsilon``, ``test_acc``) to the JSON beside the scale rows, with a
markdown table and a plot (``cross_device_accuracy.*``); ``--mechanisms dp_ftrl`` trains one of them, keeping the
other rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from common import machine_info  # benchmarks/ is on sys.path when a benchmark runs as a script

RECORDS_PER_CLIENT = 10
RECORD_BYTES = 28 * 28 * 4 + 8  # a float32 image and an int64 label


def overrides(clients: int, fraction: float, rounds: int, engine: str = "vectorized") -> list[str]:
    return [
        "data=synthetic",
        f"data.synthetic_train_size={clients * RECORDS_PER_CLIENT}",
        "data.synthetic_test_size=500",
        f"client.count={clients}",
        "client.names=[]",
        "client.sampling=poisson",
        f"client.fraction={fraction}",
        "privacy=none",
        "user_privacy=dpfedavg",
        "user_privacy.clip=0.3",
        f"user_privacy.delta={min(1e-5, 0.1 / clients)}",
        f"engine={engine}",
        f"trainer.batch_size={RECORDS_PER_CLIENT}",
        f"trainer.rounds={rounds}",
        "trainer.progress_bar=false",
    ]


def one_cell(clients: int, fraction: float, rounds: int, engine: str = "vectorized") -> dict:
    """Trains one configuration in this process; its row."""
    from fl_dp_lightning.cli import compose_overrides, run

    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as run_dir:
        results = run(compose_overrides(overrides(clients, fraction, rounds, engine)), run_dir)
    seconds = results["seconds_per_round"]
    return {
        "framework": f"fl_dp_lightning ({engine})",
        "clients": clients,
        "fraction": fraction,
        "expected_clients_per_round": clients * fraction,
        "seconds_per_round": statistics.median(seconds[1:] or seconds),
        "first_round_seconds": seconds[0],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "user_epsilon": results["user_epsilon"],
        "test_acc": results["test"]["test/acc"],
    }


def flower_cell(clients: int, rounds: int) -> dict:
    """The same round on Flower's simulation engine (default resources), in this process: ``clients`` SuperNodes,
    each training every round, Flower's ``FedAvg`` under its server-side fixed-clipping DP wrapper (noise 1.0,
    clip 0.3); seconds per round from the server's evaluation hook, which runs after each aggregation."""
    import time

    import torch
    from flower_cross_device_app import app as client_app
    from flwr.app import ArrayRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
    from flwr.simulation import run_simulation

    from fl_dp_lightning.models import seed_cnn

    server_app, marks = ServerApp(), []

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(0)
        initial = ArrayRecord(seed_cnn().state_dict())

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            marks.append(time.perf_counter())  # round 0 is the initial model
            return MetricRecord({})

        fedavg = FedAvg(fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients)
        strategy = DifferentialPrivacyServerSideFixedClipping(
            fedavg, noise_multiplier=1.0, clipping_norm=0.3, num_sampled_clients=clients
        )
        strategy.start(grid, initial, num_rounds=rounds, evaluate_fn=evaluate)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients)
    seconds = [b - a for a, b in zip(marks, marks[1:])]
    if len(seconds) != rounds:
        raise RuntimeError(f"Flower ran {len(seconds)} of {rounds} rounds (see the log above)")
    return {
        "framework": "Flower simulation",
        "clients": clients,
        "fraction": 1.0,
        "expected_clients_per_round": clients,
        "seconds_per_round": statistics.median(seconds[1:] or seconds),
        "first_round_seconds": seconds[0],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def in_fresh_process(*args: str) -> dict:
    """A row computed by this script in a new process (benchmarks/ on the PYTHONPATH, which Flower's workers
    inherit)."""
    here = Path(__file__).parent
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(here), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(args)}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def per_client_memory(rows: list[dict]) -> None:
    """Adds ``memory_per_client_kb`` (the slope of peak memory from the next smaller client count at the same
    fraction) and ``engine_memory_per_client_kb`` (less the client's records) to each row that has one."""
    for row in rows:
        smaller = [r for r in rows if r["fraction"] == row["fraction"] and r["clients"] < row["clients"]]
        if smaller:
            base = max(smaller, key=lambda r: r["clients"])
            slope = (row["peak_rss_mb"] - base["peak_rss_mb"]) * 1024 / (row["clients"] - base["clients"])
            row["memory_per_client_kb"] = slope
            row["engine_memory_per_client_kb"] = slope - RECORDS_PER_CLIENT * RECORD_BYTES / 1024


def table(rows: list[dict]) -> str:
    lines = [
        "| clients | sampled per round | seconds per round | first round (s) | peak memory (MB) "
        "| memory per client (KB) | of it, beyond its records (KB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_client = r.get("memory_per_client_kb")
        engine = r.get("engine_memory_per_client_kb")
        lines.append(
            f"| {r['clients']:,} | {r['fraction']:.0%} ({r['expected_clients_per_round']:,.0f}) "
            f"| {r['seconds_per_round']:.2f} | {r['first_round_seconds']:.2f} | {r['peak_rss_mb']:,.0f} "
            f"| {'-' if per_client is None else f'{per_client:.1f}'} | {'-' if engine is None else f'{engine:.1f}'} |"
        )
    return "\n".join(lines)


def frameworks_table(rows: list[dict]) -> str:
    """Seconds per round by clients per round, with Flower's time over ours."""
    lines = ["| clients per round | framework | seconds per round | Flower's time / this one |", "|---|---|---|---|"]
    for r in rows:
        flower = next(f for f in rows if f["framework"] == "Flower simulation" and f["clients"] == r["clients"])
        ratio = flower["seconds_per_round"] / r["seconds_per_round"]
        lines.append(f"| {r['clients']:,} | {r['framework']} | {r['seconds_per_round']:.2f} | {ratio:.1f}x |")
    return "\n".join(lines)


RECIPES = {"dp_fedavg": "cross_device_fmnist", "dp_ftrl": "cross_device_fmnist_ftrl"}


def accuracy_point(mechanism: str, epsilon: float, runs: Path) -> dict:
    """The recipe of ``mechanism`` trained to user-level ``epsilon`` (read back when its run folder holds one)."""
    folder = runs / f"{mechanism}-epsilon{epsilon:g}"
    if not (folder / "results.json").exists():
        command = [sys.executable, str(Path(__file__).parents[1] / "train.py"), f"+experiment={RECIPES[mechanism]}"]
        command += [f"user_privacy.target_epsilon={epsilon}", "trainer.progress_bar=false", f"hydra.run.dir={folder}"]
        subprocess.run(command, check=True, capture_output=True)
    results = json.loads((folder / "results.json").read_text())
    return {
        "framework": "fl_dp_lightning (vectorized)",
        "mechanism": mechanism,
        "recipe": RECIPES[mechanism],
        "clients": len(results["epsilon"]),
        "rounds": results["rounds"],
        "seconds_per_round": statistics.median(results["seconds_per_round"][1:]),
        "target_epsilon": epsilon,
        "user_epsilon": results["user_epsilon"],
        "user_delta": results["user_delta"],
        "test_acc": results["test"]["test/acc"],
    }


def accuracy_table(rows: list[dict]) -> str:
    lines = [
        "| mechanism | clients | rounds | user-level epsilon | test accuracy | seconds per round |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mechanism']} | {r['clients']:,} | {r['rounds']} | {r['user_epsilon']:.2f} | {r['test_acc']:.1%} "
            f"| {r['seconds_per_round']:.1f} |"
        )
    return "\n".join(lines)


def accuracy_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.5), layout="constrained")
    for mechanism in RECIPES:
        points = sorted((r["user_epsilon"], r["test_acc"]) for r in rows if r["mechanism"] == mechanism)
        axes.plot(*zip(*points), marker="o", label=mechanism)
    axes.set(xlabel="user-level epsilon (delta 1e-5)", ylabel="test accuracy", title="Fashion-MNIST, cross-device")
    axes.legend()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 clients, 2 rounds: the outputs' form")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cross_device.json")
    parser.add_argument(
        "--frameworks", type=int, nargs="*", help="clients per round to time beside Flower instead (e.g. 10 100 1000)"
    )
    parser.add_argument("--accuracy", type=float, nargs="*", help="user-level epsilons to train the recipes to")
    parser.add_argument("--mechanisms", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--runs", type=Path, default=Path("outputs") / "cross_device_accuracy")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # internal: clients fraction rounds engine
    parser.add_argument("--flower", nargs=2, type=int, help=argparse.SUPPRESS)  # internal: clients rounds
    args = parser.parse_args()
    if args.one:
        clients, fraction, rounds = int(args.one[0]), float(args.one[1]), int(args.one[2])
        print(json.dumps(one_cell(clients, fraction, rounds, args.one[3])))
        return
    if args.flower:
        print(json.dumps(flower_cell(*args.flower)))
        return
    if args.accuracy is not None:
        rows = [accuracy_point(m, e, args.runs) for e in args.accuracy or [1, 3] for m in args.mechanisms]
        done = {(r["mechanism"], r["target_epsilon"]) for r in rows}
        old = json.loads(args.out.read_text()) if args.out.exists() else []
        kept = [r for r in old if (r.get("mechanism"), r.get("target_epsilon")) not in done]
        rows = sorted([r for r in kept if "mechanism" in r] + [dict(r, **machine_info()) for r in rows],
                      key=lambda r: (r["mechanism"], r["target_epsilon"]))  # fmt: skip
        text = accuracy_table(rows)
        print(text)
        args.out.write_text(json.dumps([r for r in kept if "mechanism" not in r] + rows, indent=2))
        args.out.with_name(args.out.stem + "_accuracy.md").write_text(text + "\n")
        accuracy_plot(rows, args.out.with_name(args.out.stem + "_accuracy.png"))
        print(f"saved {args.out} and {args.out.stem}_accuracy.md, .png")
        return
    rounds = 2 if args.quick else args.rounds
    rows = []
    if args.frameworks is not None:  # every client trains every round: Flower's simulation has no sampling to match
        for count in args.frameworks or [10, 100, 1000]:
            for engine in ("vectorized", "opacus"):
                rows.append(in_fresh_process("--one", str(count), "1.0", str(rounds), engine))
            rows.append(in_fresh_process("--flower", str(count), str(rounds)))
            print(" | ".join(f"{r['framework']} {r['seconds_per_round']:.2f} s" for r in rows[-3:]), flush=True)
        text = frameworks_table(rows)
        args.out = args.out.with_name(args.out.stem + "_frameworks.json")
    else:
        for fraction in args.fractions:
            for count in [100, 1000] if args.quick else args.clients:
                rows.append(in_fresh_process("--one", str(count), str(fraction), str(rounds), "vectorized"))
                print(f"{count} clients, fraction {fraction}: {rows[-1]['seconds_per_round']:.2f} s per round")
        per_client_memory(rows)
        text = table(rows)
    print(text)
    machine = machine_info()
    for row in rows:
        row.update(rounds=rounds, records_per_client=RECORDS_PER_CLIENT, model="seed CNN", **machine)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    accuracy = [r for r in json.loads(args.out.read_text()) if "mechanism" in r] if args.out.exists() else []
    args.out.write_text(json.dumps(rows + accuracy, indent=2))  # a list of rows (the accuracy rows kept)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(f"saved {args.out}, {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
