"""The printed epsilon beside the audits' empirical lower bounds, setting by setting, in one run.

One-run rows are ``train.py`` with ``audit=one_run`` (canaries among alice's records, or canary clients under
user-level DP; scores from the released global model): the seed workload with Dirac and input canaries, runs
without DP (the audit's power), and noised runs beside their broken twins, which change the mechanism but not the
accountant and must be caught. Each is trained ``--repeats`` times with fresh secret coins. Many-run rows play the
membership game (Jagielski et al. 2020): ``--runs`` trainings of a small setting with one Dirac canary each, its
coin a fair one per training, a threshold at 0 on its score, and Clopper-Pearson limits on the error rates.
Prints a markdown table, saves JSON and, with matplotlib, a PNG (default benchmarks/results/audit.*).

    python benchmarks/audit.py [--repeats 2] [--runs 100] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from common import machine_info, pyplot, save_figure, save_json  # benchmarks/ is on sys.path as a script

SYNTHETIC = ["data=synthetic", "trainer.rounds=3"]
INPUT_NO_DP = ["data=synthetic", "trainer.rounds=15", "audit.canary=input", "audit.canaries=100", "audit.guesses=20"]
USER = [*SYNTHETIC, "privacy=none", "client.count=100", "trainer.batch_size=10", "user_privacy=dpfedavg"]
USER += ["user_privacy.clip=0.1", "user_privacy.noise_multiplier=5"]


@contextlib.contextmanager
def patched(*replacements: tuple[object, str, Callable[..., object]]) -> Iterator[None]:
    """Each ``(owner, name, value)`` set for the block and restored after it."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in replacements]
    for owner, name, value in replacements:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def twin(kind: str | None) -> contextlib.AbstractContextManager:
    """A broken twin: ``no_noise`` (both engines' noise drawn as zeros, still accounted), ``no_clip`` (records
    and canaries unclipped, the noise still scaled to the clip), ``user_no_noise`` (the server's user-level noise
    zero, still accounted); ``None``: the mechanism as it is."""
    import opacus.optimizers.optimizer as opacus_optimizer
    from opacus.optimizers import DPOptimizer

    import fl_dp_lightning.runtime.vectorized.dpsgd as dpsgd
    import fl_dp_lightning.runtime.vectorized.engine as engine
    import fl_dp_lightning.server.user_level as user_level

    if kind == "no_noise":
        return patched(
            (opacus_optimizer, "_generate_noise", lambda std, reference, *a, **k: torch.zeros_like(reference)),
            (engine, "gaussian_noise", lambda std, like, *a, **k: torch.zeros_like(like)),
        )
    if kind == "no_clip":
        clip_and_accumulate = DPOptimizer.clip_and_accumulate

        def unclipped(self: DPOptimizer) -> None:
            real, self.max_grad_norm = self.max_grad_norm, float("inf")
            clip_and_accumulate(self)
            self.max_grad_norm = real

        return patched(
            (DPOptimizer, "clip_and_accumulate", unclipped), (dpsgd, "clip_factors", lambda norms, bound: norms * 0 + 1)
        )
    if kind == "user_no_noise":
        noised_mean = user_level.noised_mean
        return patched((user_level, "noised_mean", lambda summed, **k: noised_mean(summed, **k | {"clip": 0})))
    return contextlib.nullcontext()


ONE_RUN = {
    "seed workload, Dirac canaries, engine=opacus": ([], None),
    "seed workload, Dirac canaries, engine=vectorized": (["engine=vectorized"], None),
    "seed workload, input canaries": (["audit.canary=input"], None),
    "synthetic, no DP, Dirac canaries": ([*SYNTHETIC, "privacy=none"], None),
    "synthetic, no DP, input canaries (15 rounds)": ([*INPUT_NO_DP, "privacy=none"], None),
    "synthetic, noise 20": ([*SYNTHETIC, "privacy.noise_multiplier=20"], None),
    "synthetic, noise 20 accounted, none added (broken)": ([*SYNTHETIC, "privacy.noise_multiplier=20"], "no_noise"),
    "synthetic, noise 3": ([*SYNTHETIC, "privacy.noise_multiplier=3"], None),
    "synthetic, noise 3, clipping skipped (broken)": ([*SYNTHETIC, "privacy.noise_multiplier=3"], "no_clip"),
    "user-level DP-FedAvg, 100 clients, noise 5": (USER, None),
    "user-level, noise 5 accounted, none added (broken)": (USER, "user_no_noise"),
}
MANY_RUNS = {
    "many-run game: synthetic, no DP": ([*SYNTHETIC, "privacy=none"], None),
    "many-run game: synthetic, seed noise 1.2": (SYNTHETIC, None),
    "many-run game: noise 20 accounted, none added (broken)": ([*SYNTHETIC, "privacy.noise_multiplier=20"], "no_noise"),
}


def audited_fit(overrides: list[str], run_dir: str) -> tuple[object, object, float | None, float]:
    """One audited fit as train.py builds it: the audit callback, the released model, alice's epsilon, delta."""
    from fl_dp_lightning.audit.run import OneRunAudit
    from fl_dp_lightning.cli import build, compose_overrides, to_config

    conf = to_config(compose_overrides(["audit=one_run", *overrides, "trainer.progress_bar=false"]))
    trainer, module, datamodule = build(conf, Path(run_dir))
    trainer.fit(module, datamodule)
    audit = next(cb for cb in trainer.callbacks if isinstance(cb, OneRunAudit))
    return audit, module, trainer.strategy.epsilons()["alice"], conf.privacy.delta


def one_run_row(name: str, overrides: list[str], broken: str | None, repeat: int) -> dict:
    from fl_dp_lightning.cli import compose_overrides, run

    start = time.perf_counter()
    conf = compose_overrides(["audit=one_run", *overrides, "trainer.progress_bar=false"])
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as run_dir, twin(broken):
        results = run(conf, run_dir)
    audit = results["audit"]
    return {
        "setting": name,
        "method": "one_run",
        "repeat": repeat,
        "canary": audit["canary"],
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


def many_run_row(name: str, overrides: list[str], broken: str | None, runs: int) -> dict:
    """The membership game over ``runs`` trainings, each scoring one Dirac canary (the second is the least the
    audit draws, and is ignored)."""
    from fl_dp_lightning.audit.bounds import membership_lower_bound

    start = time.perf_counter()
    outcomes = []  # (coin, guessed true)
    for _ in range(runs):
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as run_dir, twin(broken):
            audit, module, epsilon, delta = audited_fit([*overrides, "audit.canaries=2", "audit.guesses=2"], run_dir)
        outcomes.append((bool(audit.canaries.coins[0]), bool(audit.scores(module)[0] > 0)))
    positives = sum(coin for coin, _ in outcomes)
    false_negatives = sum(coin and not said for coin, said in outcomes)
    false_positives = sum(said and not coin for coin, said in outcomes)
    bound = membership_lower_bound(false_positives, runs - positives, false_negatives, positives, delta)
    return {
        "setting": name,
        "method": "many_runs",
        "repeat": 0,
        "canary": "dirac",
        "epsilon": epsilon,
        "epsilon_lower_bound": bound,
        "correct_guesses": runs - false_positives - false_negatives,
        "guesses": runs,
        "canaries": 1,
        "confidence": 0.95,
        "delta": delta,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="one-run trainings per setting, fresh coins each")
    parser.add_argument("--runs", type=int, default=100, help="trainings per many-run membership game")
    parser.add_argument("--quick", action="store_true", help="3 settings, synthetic, 1 round, 4 runs: the form")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "audit.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    quick = ["data=synthetic", "trainer.rounds=1", "audit.canaries=20", "audit.guesses=10"] if args.quick else []
    one_run = {k: ONE_RUN[k] for k in list(ONE_RUN)[:1] + list(ONE_RUN)[6:7]} if args.quick else ONE_RUN
    many = dict(list(MANY_RUNS.items())[:1]) if args.quick else MANY_RUNS
    rows = []
    for name, (overrides, broken) in one_run.items():
        for repeat in range(1 if args.quick else args.repeats):
            rows.append(one_run_row(name, [*overrides, *quick], broken, repeat))
            print(f"{name:>56}  lower bound {rows[-1]['epsilon_lower_bound']:.2f}", flush=True)
    for name, (overrides, broken) in many.items():
        rows.append(many_run_row(name, [*overrides, *quick[:2]], broken, 4 if args.quick else args.runs))
        print(f"{name:>56}  lower bound {rows[-1]['epsilon_lower_bound']:.2f}", flush=True)
    settings = [*one_run, *many]
    table = [
        "| setting | method | printed epsilon | lower bound (each run) | right guesses | canaries | caught |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in settings:
        mine = [r for r in rows if r["setting"] == name]
        printed = mine[0]["epsilon"]
        bounds = [r["epsilon_lower_bound"] for r in mine]
        caught = printed is not None and max(bounds) > printed
        shown = "no DP" if printed is None else f"{printed:.2f}"
        right = ", ".join(f"{r['correct_guesses']}/{r['guesses']}" for r in mine)
        method = "one run" if mine[0]["method"] == "one_run" else f"{mine[0]['guesses']} runs"
        cells = [name, method, shown, ", ".join(f"{b:.2f}" for b in bounds), right, str(mine[0]["canaries"])]
        table.append("| " + " | ".join([*cells, "**yes**" if caught else "no"]) + " |")
    print("\n".join(table))
    save_json(args.out, {**machine_info(), "rows": rows, "table": table})
    args.out.with_suffix(".md").write_text("\n".join(table) + "\n")
    plot(rows, settings, args.out.with_suffix(".png"))


def plot(rows: list[dict], settings: list[str], path: Path) -> None:
    """One line per setting: its bounds (dots) beside its printed epsilon (a bar), if matplotlib is there."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(settings) + 1.2))
    for i, name in enumerate(settings):
        mine = [r for r in rows if r["setting"] == name]
        ax.scatter([r["epsilon_lower_bound"] for r in mine], [i] * len(mine), color="tab:red", zorder=3)
        if mine[0]["epsilon"] is not None:
            ax.vlines(mine[0]["epsilon"], i - 0.35, i + 0.35, color="tab:blue", linewidth=3)
    ax.scatter([], [], color="tab:red", label="empirical lower bound (each run or game)")
    ax.plot([], [], color="tab:blue", linewidth=3, label="printed epsilon (accountant)")
    ax.set_yticks(range(len(settings)), settings, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("epsilon")
    ax.set_title(f"empirical audits, {statistics.mode(r['confidence'] for r in rows):.0%} confidence", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
