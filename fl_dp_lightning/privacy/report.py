"""The privacy report written at the end of every run: what each client spent, what left it, what it means."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from fl_dp_lightning.privacy.accountants import ADJACENCY
from fl_dp_lightning.update import FederatedRun

GUARANTEE = (
    "Record-level (epsilon, delta)-differential privacy for each client's own data set, under replace-one adjacency "
    "(two data sets of the same size that differ in one record), covering everything that client released: its "
    "model after each round, hence the global model. Its record count and whether it took part in a round are public."
)

RELEASED = (
    "model weights after each round: DP-SGD (per-example clipping, Gaussian noise), accounted in epsilon",
    "each client's record count (FedAvg weight, sample rate, steps): public under replace-one adjacency",
    "which clients trained in each round (client sampling, budgets): public",
    "epsilon per client and round: computed from the public settings and record count",
    "validation and test metrics: computed on the shared public set, not on client data",
)

USER_LEVEL_ONLY = (
    "no record-level DP (privacy.enabled is false); under user-level DP only each round's global model leaves (the "
    "clipped updates' noised mean): per-client training metrics, training-stage self.log, held-out metrics, class "
    "counts and error messages are withheld"
)

SYFT_REPLY = (
    "client.runtime=syft: each datasite's reply: the weights above, its record count, epsilon and its accountant's "
    "history (noise, sample rate, steps: public settings); its random streams stay in the datasite"
)

SHOWN_CLIENTS = 20
"""Clients listed in the log's table; the JSON report lists every client."""

ALWAYS_NOT_COVERED = (
    "values your own callbacks compute from training_step outputs (on_train_batch_end) and release themselves",
)


def privacy_report(strategy: FederatedRun) -> dict[str, Any]:
    """Per-client epsilon, the settings behind it, every channel a client released and every weakening opt-in.

    Args:
        strategy: the run's federated strategy (``FederatedDPStrategy`` or its multi-process variant).
    """
    privacy = strategy.privacy
    withheld = strategy.participation_withheld
    rows = {}
    for name, client in strategy.records().items():
        rows[name] = {
            "epsilon": client.epsilon,
            "delta": privacy.delta if privacy.enabled else None,
            "noise_multiplier": client.noise_multiplier if privacy.enabled else None,
            "max_grad_norm": client.max_grad_norm if privacy.enabled else None,
            "batch_size": client.batch_size,
            "local_epochs": client.local_epochs,
            "sample_rate": client.sample_rate,
            "steps": None if withheld else client.steps_taken,
            "num_examples": client.num_examples,
        }
    if privacy.enabled:
        released = list(RELEASED)
    elif strategy.user_level is not None:
        released = [USER_LEVEL_ONLY]
    else:
        released = ["everything: no record-level DP (privacy.enabled is false)"]
    if strategy.secure_aggregation.enabled:
        released.append(
            "secure aggregation (simulated): the server decodes only each round's sum of the clients' contributions"
        )
    if privacy.enabled and strategy.syft is not None:
        released.append(SYFT_REPLY)
    if privacy.enabled and privacy.unsafe_release_training_metrics:
        released.append("per-client training metrics, training-stage self.log, raw gradients: NOT covered")
    return {
        "enabled": privacy.enabled,
        "accountant": privacy.accountant if privacy.enabled else None,
        "rdp_conversion": privacy.rdp_conversion if privacy.enabled and privacy.accountant == "rdp" else None,
        "adjacency": ADJACENCY if privacy.enabled else None,
        "poisson_sampling": privacy.poisson_sampling,
        "settings": asdict(privacy),
        "guarantee": guarantee_sentence(strategy),
        "released": released,
        "not_covered": [*privacy.weakened_by(), *ALWAYS_NOT_COVERED, *fault_release(strategy), *syft_release(strategy)]
        if privacy.enabled
        else [],
        "syft": None if strategy.syft is None else syft_mode(strategy.syft.port),
        "faults": [{"round": f["round"], "client": None, "reason": f["reason"]} for f in strategy.faults]
        if withheld
        else strategy.faults,
        "user_level": None
        if strategy.user_level is None
        else strategy.user_level.report(guaranteed=not privacy.unsafe_seeded_randomness),
        "clients": rows,
    }


def syft_mode(port: int | None) -> dict[str, str]:
    """Which datasite mode ran, and what it isolates."""
    if port is None:
        return {
            "mode": "in-process datasites (client.syft.port=null)",
            "isolation": "none: a single-process simulation; the server's process can read every record and every "
            "datasite's state (its accountant, its approved-round count)",
        }
    return {
        "mode": f"loopback servers (127.0.0.1:{port} and up), one process per datasite",
        "isolation": "each client's records, accountant, random streams and approved-round count live only in its "
        "datasite's process; the server's process keeps their record counts and talks to each datasite as a "
        "data scientist, whose account cannot read the private asset; each owner's login is a generated secret",
    }


def syft_release(strategy: Any) -> list[str]:
    """PySyft's own channel: it hands the data scientist the error of approved code that fails on private data."""
    if strategy.syft is None:
        return []
    return [
        "client.runtime=syft: PySyft hands the server the error message of approved code that fails on the private "
        "asset (we do not log it under DP, but the server process receives it); a message can quote private data"
    ]


def fault_release(strategy: Any) -> list[str]:
    """A client's failure can depend on its records: the fault events are released outside the accountant."""
    if not strategy.faults:
        return []
    return ["which client failed in which round (the report's faults): a failure can depend on the client's records"]


def guarantee_sentence(strategy: Any) -> str:
    """The guarantee the run's epsilons carry, or why there is none."""
    privacy = strategy.privacy
    if not privacy.enabled:
        return "none: privacy.enabled is false (plain federated averaging)"
    if strategy.guaranteed:
        return GUARANTEE
    return "none proven; see not_covered: " + "; ".join(privacy.weakened_by())


def format_report(report: Mapping[str, Any]) -> str:
    """The report as a text table for the log."""
    header = f"{'client':>12} {'epsilon':>9} {'delta':>8} {'noise':>7} {'clip':>6} {'q':>8} {'steps':>7} {'records':>8}"
    if report["enabled"]:
        title = f"Privacy report (accountant {report['accountant']}, {report['adjacency']} adjacency)"
    else:
        title = "Privacy report: no DP"
    lines = [title, header]

    def cell(value: Any, fmt: str, width: int) -> str:
        return f"{'-':>{width}}" if value is None else format(value, f"{width}{fmt}")

    rows = list(report["clients"].items())
    for name, r in rows[:SHOWN_CLIENTS]:
        lines.append(
            f"{name:>12} {cell(r['epsilon'], '.4f', 9)} {cell(r['delta'], '.0e', 8)} "
            f"{cell(r['noise_multiplier'], '.3f', 7)} {cell(r['max_grad_norm'], '.2f', 6)} "
            f"{r['sample_rate']:8.5f} {cell(r['steps'], 'd', 7)} {r['num_examples']:8d}"
        )
    if len(rows) > SHOWN_CLIENTS:
        eps = sorted(r["epsilon"] for _, r in rows if r["epsilon"] is not None)
        spread = f"; epsilon min {eps[0]:.4f}, max {eps[-1]:.4f}" if eps else ""
        lines.append(f"... and {len(rows) - SHOWN_CLIENTS} more clients{spread} (every client in the JSON report)")
    lines.append(f"Guarantee: {report['guarantee']}")
    user = report.get("user_level")
    if user is not None:
        lines.append(
            f"User-level ({user['accountant']}, {user['adjacency']}): epsilon {user['epsilon']:.4f} at delta "
            f"{user['delta']:g} after {user['rounds']} rounds (server noise {user['noise_multiplier']:.3f}, clip "
            f"{user['clip']:.4g}, client sampling rate {user['sample_rate']:.4g}). Guarantee: {user['guarantee']}"
        )
        lines.append(f"Participation: {user['participation']}")
        lines += [f"Not covered (user-level): {item}" for item in user["not_covered"]]
    lines += [f"Released: {item}" for item in report["released"]]
    lines += [f"Not covered: {item}" for item in report["not_covered"]]
    return "\n".join(lines)
