"""What secure aggregation costs per round: bytes each client sends and seconds for setting up, masking and
unmasking, at 10, 100 and 1,000 clients, for an update the size of the seed CNN (26,010 parameters).

Every party runs in this one process, one after another: a client's seconds are what its own device would
spend; the server's are the unmasking. Up to 100 clients each masks with all others (Bonawitz et al. 2017);
above that with ``--neighbors`` others (SecAgg+, Bell et al. 2020), as full pairwise masking grows with n^2.
Prints a markdown table, saves JSON.

    python benchmarks/secure_aggregation.py [--clients 10 100 1000] [--neighbors 20] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from common import machine_info, save_json  # benchmarks/ is on sys.path when a benchmark runs as a script

from fl_dp_lightning.server.secure_sum import SecureRound

PARAMETERS = 26_010
BITS, SCALE = 48, 2.0**20


def measure(clients: int, neighbors: int | None, length: int, dropped: int) -> dict:
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    round_ = SecureRound(clients, bits=BITS, scale=SCALE, threshold=0.5, degree=neighbors, seed=0)
    setup = time.perf_counter() - start
    updates = [rng.normal(0, 0.01, length) for _ in range(clients)]
    start = time.perf_counter()
    for index in range(dropped, clients):  # the first `dropped` clients drop out after the masks were set up
        round_.submit(index, updates[index])
    masking = (time.perf_counter() - start) / (clients - dropped)
    start = time.perf_counter()
    total = round_.unmask(length)
    unmasking = time.perf_counter() - start
    error = float(np.abs(total - sum(updates[dropped:])).max())
    return {
        "clients": clients,
        "neighbors": len(round_.graph[0]),
        "dropped": dropped,
        "bytes_per_client": int(np.mean(list(round_.bytes_sent.values()))),
        "plain_bytes_per_client": length * 4,
        "setup_seconds_all_clients": setup,
        "masking_seconds_per_client": masking,
        "unmasking_seconds_server": unmasking,
        "max_abs_error": error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--neighbors", type=int, default=20, help="neighbours per client above 100 clients")
    parser.add_argument("--quick", action="store_true", help="10 and 30 clients, 1,000 parameters")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "secure_aggregation.json")
    args = parser.parse_args()
    counts, length = ([10, 30], 1_000) if args.quick else (args.clients, PARAMETERS)
    rows = []
    for count in counts:
        rows.append(measure(count, None if count <= 100 else args.neighbors, length, dropped=max(1, count // 10)))
        print(json.dumps(rows[-1]), flush=True)
    table = [
        "| clients | neighbours | dropped | bytes sent per client (plain float32) | key setup, all clients (s) "
        "| masking per client (s) | unmasking at the server (s) | max error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['clients']} | {r['neighbors']} | {r['dropped']} | {r['bytes_per_client']:,} "
            f"({r['plain_bytes_per_client']:,}) | {r['setup_seconds_all_clients']:.2f} "
            f"| {r['masking_seconds_per_client']:.3f} | {r['unmasking_seconds_server']:.2f} "
            f"| {r['max_abs_error']:.1e} |"
        )
    print("\n".join(table))
    settings = {"parameters": length, "bits": BITS, "scale": SCALE, "threshold": 0.5}
    save_json(args.out, {**machine_info(), "settings": settings, "rows": rows, "table": table})


if __name__ == "__main__":
    main()
