"""The privacy report written at the end of every run: what each client spent and what it means."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from fl_dp_lightning.config import PrivacyConfig

GUARANTEE = (
    "Record-level (epsilon, delta)-differential privacy for each client's own data set, under add/remove-one-record "
    "adjacency, covering everything that client released (its model after each round, hence the global model). "
    "Not covered: which clients took part in a round and how many records each holds (the FedAvg weights)."
)


def privacy_report(clients: Mapping[str, Any], privacy: PrivacyConfig) -> dict[str, Any]:
    """Per-client epsilon and the settings behind it; ``clients`` maps names to ``ClientState``."""
    rows = {}
    for name, client in clients.items():
        history = [] if client.accountant is None else client.accountant.history
        rows[name] = {
            "epsilon": client.epsilon(privacy.delta),
            "delta": privacy.delta if privacy.enabled else None,
            "noise_multiplier": client.noise_multiplier if privacy.enabled else None,
            "max_grad_norm": privacy.max_grad_norm if privacy.enabled else None,
            "sample_rate": client.sample_rate,
            "steps": sum(steps for _, _, steps in history),
            "num_examples": client.num_examples,
        }
    return {
        "enabled": privacy.enabled,
        "accountant": privacy.accountant,
        "rdp_conversion": privacy.rdp_conversion if privacy.accountant == "rdp" else None,
        "poisson_sampling": privacy.poisson_sampling,
        "settings": asdict(privacy),
        "guarantee": GUARANTEE if privacy.enabled else "none: privacy.enabled is false",
        "clients": rows,
    }


def format_report(report: Mapping[str, Any]) -> str:
    """The report as a text table for the log."""
    header = f"{'client':>12} {'epsilon':>9} {'delta':>8} {'noise':>7} {'clip':>6} {'q':>8} {'steps':>7} {'records':>8}"
    lines = [f"Privacy report (accountant {report['accountant']}, conversion {report['rdp_conversion']})", header]

    def cell(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for name, r in report["clients"].items():
        lines.append(
            f"{name:>12} {cell(r['epsilon'], '9.4f')} {cell(r['delta'], '8.0e')} {cell(r['noise_multiplier'], '7.3f')} "
            f"{cell(r['max_grad_norm'], '6.2f')} {r['sample_rate']:8.5f} {r['steps']:7d} {r['num_examples']:8d}"
        )
    lines.append(report["guarantee"])
    return "\n".join(lines)
