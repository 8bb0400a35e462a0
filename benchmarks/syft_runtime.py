"""Seconds per round of clients as PySyft datasites against the local runtime, on the seed workload.

The same run three times, each ``python train.py ... engine=vectorized`` in a fresh process: clients in this
process (``client.runtime=local``), as PySyft datasites in this process, and as datasites behind loopback HTTP
servers (``client.syft.port``). Same engine, data, privacy and rounds; prints a table and saves JSON and markdown
(default benchmarks/results/syft_runtime.*). Run it where PySyft is installed (``make syft-test`` builds it):

    .venv-syft/bin/python benchmarks/syft_runtime.py [--rounds 3] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import machine_info, save_json  # benchmarks/ is on sys.path when a benchmark runs as a script
from frameworks import train_py

RUNS = {
    "local (client.runtime=local)": [],
    "PySyft datasites in this process": ["client.runtime=syft"],
    "PySyft datasites behind loopback servers": ["client.runtime=syft", "client.syft.port=18400"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="synthetic data: checks the outputs' form")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "syft_runtime.json")
    args = parser.parse_args()
    data = "synthetic" if args.quick else "fashion_mnist"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in RUNS.items():
            run_dir = Path(tmp) / str(len(results))
            results[name] = train_py(data, args.rounds, ["engine=vectorized", *overrides], run_dir)
    local = statistics.median(row["seconds"] for row in results[next(iter(RUNS))]["history"])
    lines = [
        f"| clients ({data}, {args.rounds} rounds, engine=vectorized) | s / round (median) | x local "
        "| end to end s | accuracy | ε |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        per_round = statistics.median(row["seconds"] for row in result["history"])
        last = result["history"][-1]
        lines.append(
            f"| {name} | {per_round:.2f} | {per_round / local:.2f} | {result['end_to_end_seconds']:.1f} "
            f"| {100 * last['val/acc']:.1f} % | {last['epsilon_max']:.2f} |"
        )
    markdown = "\n".join(lines)
    print(markdown)
    payload = {"benchmark": "syft_runtime", "data": data, "rounds": args.rounds, "results": results}
    save_json(args.out, payload | {"machine": machine_info()})
    args.out.with_suffix(".md").write_text(markdown + "\n")


if __name__ == "__main__":
    main()
