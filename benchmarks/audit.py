"""The printed epsilon beside the one-run audit's empirical lower bound, setting by setting, in one run.

Each row is ``train.py`` with ``audit=one_run`` (canaries among alice's records, scores from the released global
model): the seed workload under both engines; a run without DP (the audit's power); a heavily noised run with a
clip that rarely binds, and its broken twin that accounts the same noise but adds none, which the audit must
catch. Each setting is trained ``--repeats`` times (fresh secret coins each time). Prints a markdown table, saves
JSON and, with matplotlib, a PNG (default benchmarks/results/audit.*).

    python benchmarks/audit.py [--repeats 2] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from common import machine_info, pyplot, save_figure, save_json  # benchmarks/ is on sys.path as a script

SMALL = ["data=synthetic", "trainer.rounds=15", "audit.canaries=100", "audit.guesses=20"]
NOISED = [*SMALL, "privacy.noise_multiplier=20", "privacy.max_grad_norm=100"]
SETTINGS = {
    "seed workload, engine=opacus": ([], False),
    "seed workload, engine=vectorized": (["engine=vectorized"], False),
    "synthetic, no DP": ([*SMALL, "privacy=none"], False),
    "synthetic, noise 20": (NOISED, False),
    "synthetic, noise 20 accounted, none added (broken)": (NOISED, True),
}


@contextlib.contextmanager
def noise_not_added(broken: bool) -> Iterator[None]:
    """The broken twin: both engines' noise replaced by zeros while the accountants count it."""
    import opacus.optimizers.optimizer as opacus_optimizer

    import fl_dp_lightning.runtime.vectorized.engine as engine

    saved = opacus_optimizer._generate_noise, engine.gaussian_noise
    if broken:
        opacus_optimizer._generate_noise = lambda std, reference, *a, **k: torch.zeros_like(reference)
        engine.gaussian_noise = lambda std, like, *a, **k: torch.zeros_like(like)
    try:
        yield
    finally:
        opacus_optimizer._generate_noise, engine.gaussian_noise = saved


def main() -> None:
    from fl_dp_lightning.cli import compose_overrides, run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="trainings per setting, each with fresh coins")
    parser.add_argument("--quick", action="store_true", help="2 settings, synthetic, 1 round: the form")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "audit.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    quick = ["data=synthetic", "trainer.rounds=1", "audit.canaries=20", "audit.guesses=10"] if args.quick else []
    rows = []
    settings = {k: SETTINGS[k] for k in list(SETTINGS)[::4]} if args.quick else SETTINGS  # quick: first, last
    for name, (overrides, broken) in settings.items():
        for repeat in range(1 if args.quick else args.repeats):
            start = time.perf_counter()
            conf = compose_overrides(["audit=one_run", *overrides, *quick, "trainer.progress_bar=false"])
            with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as run_dir, noise_not_added(broken):
                results = run(conf, run_dir)
            audit = results["audit"]
            rows.append(
                {
                    "setting": name,
                    "repeat": repeat,
                    "method": audit["method"],
                    "epsilon": audit["epsilon"],
                    "epsilon_lower_bound": audit["epsilon_lower_bound"],
                    "correct_guesses": audit["correct_guesses"],
                    "guesses": audit["guesses"],
                    "canaries": audit["canaries"],
                    "confidence": audit["confidence"],
                    "delta": audit["delta"],
                    "rounds": results["rounds"],
                    "test_acc": results["test"].get("test/acc"),
                    "data_origin": results["data_origin"],
                    "seconds": time.perf_counter() - start,
                }
            )
            print(f"{name:>52}  lower bound {audit['epsilon_lower_bound']:.2f}  printed {audit['epsilon']}", flush=True)
    table = [
        "| setting | printed epsilon | lower bound (each run) | right guesses | canaries | caught |",
        "|---|---|---|---|---|---|",
    ]
    for name in settings:
        mine = [r for r in rows if r["setting"] == name]
        printed = mine[0]["epsilon"]
        bounds = [r["epsilon_lower_bound"] for r in mine]
        caught = printed is not None and max(bounds) > printed
        shown = "no DP" if printed is None else f"{printed:.2f}"
        right = ", ".join(f"{r['correct_guesses']}/{r['guesses']}" for r in mine)
        cells = [name, shown, ", ".join(f"{b:.2f}" for b in bounds), right, str(mine[0]["canaries"])]
        table.append("| " + " | ".join([*cells, "**yes**" if caught else "no"]) + " |")
    print("\n".join(table))
    save_json(args.out, {**machine_info(), "rows": rows, "table": table})
    args.out.with_suffix(".md").write_text("\n".join(table) + "\n")
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(settings)
    for i, name in enumerate(names):
        mine = [r for r in rows if r["setting"] == name]
        ax.scatter([i] * len(mine), [r["epsilon_lower_bound"] for r in mine], color="tab:red", zorder=3)
        if mine[0]["epsilon"] is not None:
            ax.hlines(mine[0]["epsilon"], i - 0.3, i + 0.3, color="tab:blue", linewidth=3)
    ax.scatter([], [], color="tab:red", label="empirical lower bound (one run each)")
    ax.plot([], [], color="tab:blue", linewidth=3, label="printed epsilon (accountant)")
    ax.set_xticks(range(len(names)), [n.replace(", ", ",\n", 1) for n in names], fontsize=7)
    ax.set_ylabel("epsilon")
    ax.set_title(f"one-run audit, {statistics.mode(r['confidence'] for r in rows):.0%} confidence")
    ax.legend(fontsize=8)
    save_figure(fig, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
