"""A Hydra sweep's runs as one table and one picture: test accuracy against epsilon.

    python train.py -m data=fashion_mnist privacy.target_epsilon=0.5,1,2,4,8
    python -m fl_dp_lightning.plot multirun/<date>/<time>

Reads every run's ``results.json`` and ``.hydra/overrides.yaml`` under the folder; writes ``sweep.md`` (the table),
``sweep.json`` (the rows) and, with matplotlib, ``sweep.png`` (accuracy against the largest per-client epsilon,
each point labelled with its overrides; runs without DP as a horizontal line) into the folder, or under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def collect(folder: Path) -> list[dict[str, Any]]:
    """One row per run under ``folder``: its overrides, test accuracy, epsilon (the largest client's) and delta."""
    rows = []
    for results_path in sorted(folder.rglob("results.json")):
        results = json.loads(results_path.read_text())
        overrides_path = results_path.parent / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.to_container(OmegaConf.load(overrides_path)) if overrides_path.exists() else []
        epsilons = [e for e in results.get("epsilon", {}).values() if e is not None]
        rows.append(
            {
                "run": str(results_path.parent.relative_to(folder)),
                "overrides": overrides or [],
                "test_acc": results["test"].get("test/acc"),
                "epsilon": max(epsilons) if epsilons else None,
                "delta": results.get("delta"),
                "user_epsilon": results.get("user_epsilon"),
                "rounds": results.get("rounds"),
            }
        )
    if not rows:
        raise SystemExit(f"error: no results.json under {folder}; give the folder of a sweep (multirun/<date>/<time>)")
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table, by epsilon (runs without DP last)."""

    def cell(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [
        "| run | overrides | rounds | epsilon | delta | user-level epsilon | test accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["epsilon"] is None, r["epsilon"] or 0)):
        lines.append(
            f"| {r['run']} | {' '.join(r['overrides'])} | {cell(r['rounds'], 'd')} | {cell(r['epsilon'], '.3f')} "
            f"| {cell(r['delta'], 'g')} | {cell(r['user_epsilon'], '.3f')} | {cell(r['test_acc'], '.4f')} |"
        )
    return "\n".join(lines)


RUN_OPTIONS = ("trainer.progress_bar", "trainer.log_every_n_steps", "trainer.ckpt_path", "hydra.")
"""Overrides that change how a run is shown or stored, not what it trains: left out of labels and titles."""


def settings(row: dict[str, Any]) -> list[str]:
    """The overrides of ``row`` that are experimental settings (not :data:`RUN_OPTIONS`)."""
    return [o for o in row["overrides"] if not o.lower().startswith(RUN_OPTIONS)]


def shared_overrides(rows: list[dict[str, Any]]) -> set[str]:
    """The settings every one of ``rows`` has (compared in lower case: Hydra's sweeps write ``False``)."""
    return set.intersection(*({o.lower() for o in settings(r)} for r in rows)) if rows else set()


def own(row: dict[str, Any], shared: set[str]) -> list[str]:
    """The settings of ``row`` beyond ``shared``: what labels its point."""
    return [o for o in settings(row) if o.lower() not in shared]


def figure(rows: list[dict[str, Any]]) -> Any:
    """Accuracy against epsilon (log scale, a tick at each run's epsilon), each point labelled with its own
    settings, runs without DP as dashed lines, the settings every run shares as the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    private = sorted((r for r in rows if r["epsilon"] is not None), key=lambda r: r["epsilon"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if private:
        on_every_point = shared_overrides(private)
        epsilons = [r["epsilon"] for r in private]
        ax.plot(epsilons, [r["test_acc"] for r in private], "o-", label="DP")
        for i, r in enumerate(private):
            last = i == len(private) - 1  # its label goes left of the point, inside the axes
            ax.annotate(
                " ".join(own(r, on_every_point)),
                (r["epsilon"], r["test_acc"]),
                fontsize=7,
                xytext=(-4, 6) if last else (4, -10),
                textcoords="offset points",
                ha="right" if last else "left",
            )
        ax.set_xscale("log")
        ax.minorticks_off()
        ticks = sorted(set(epsilons))
        ax.set_xticks(ticks, [f"{e:.3g}" for e in ticks], rotation=35, ha="right", fontsize=8)
        ax.margins(x=0.15, y=0.15)
    on_every_run = shared_overrides(rows)
    for r in (r for r in rows if r["epsilon"] is None):
        ax.axhline(r["test_acc"], linestyle="--", color="gray", label=f"no DP ({' '.join(own(r, on_every_run))})")
    shared = [o for o in settings(rows[0]) if o.lower() in on_every_run] if rows else []
    ax.set_title(textwrap.fill(" ".join(shared), 110), fontsize=7)  # what every run shares, once
    ax.set(xlabel="epsilon (largest client's)", ylabel="test accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def draw(rows: list[dict[str, Any]], path: Path) -> bool:
    """Saves :func:`figure` to ``path``; False without matplotlib."""
    try:
        fig = figure(rows)
    except ImportError:
        return False
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the sweep's folder: multirun/<date>/<time>")
    parser.add_argument("--out", type=Path, help="folder for sweep.md, sweep.json and sweep.png (default: the sweep's)")
    args = parser.parse_args(argv)
    rows = collect(args.folder)
    out = args.out or args.folder
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    (out / "sweep.md").write_text(table + "\n")
    (out / "sweep.json").write_text(json.dumps(rows, indent=2))
    print(table)
    drawn = draw(rows, out / "sweep.png")
    picture = f", {out / 'sweep.png'}" if drawn else " (no plot: pip install 'fl_dp_lightning[plot]')"
    print(f"saved {out / 'sweep.md'}, {out / 'sweep.json'}{picture}")


if __name__ == "__main__":
    main()
