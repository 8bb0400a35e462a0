"""The one-run audit through ``train.py``'s run(): sound where the mechanism is, with power where it is not.

Each test trains for real with canaries among alice's records and reads only the released global model; the
broken twin adds no noise where the accountant counts it, which the audit must catch."""

from __future__ import annotations

import json

import opacus.optimizers.optimizer
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import fl_dp_lightning.runtime.vectorized.engine
from fl_dp_lightning.cli import run

from ..config.test_config import composed

ENGINES = ["opacus", "vectorized"]
# 15 rounds is where a model trained without DP on these records has memorized its canaries (20 of 20 guesses)
POWER = ("data=synthetic", "trainer.rounds=15", "audit=one_run", "audit.canaries=100", "audit.guesses=20")
pytestmark = pytest.mark.filterwarnings("ignore:The number of training batches")


def audited(tmp_path, *overrides: str) -> dict:
    return run(composed(*overrides, "trainer.progress_bar=false"), tmp_path)["audit"]


@pytest.mark.parametrize("engine", ENGINES)
def test_the_seed_mechanism_audited_gives_a_bound_at_or_below_its_printed_epsilon(tmp_path, engine):
    results = run(
        composed(
            "data=synthetic", "trainer.rounds=3", "audit=one_run", f"engine={engine}", "trainer.progress_bar=false"
        ),
        tmp_path,
    )
    audit = results["audit"]
    assert audit["client"] == "alice" and audit["epsilon"] == results["epsilon"]["alice"]
    assert 0 <= audit["epsilon_lower_bound"] <= audit["epsilon"]
    assert (audit["canaries"], audit["guesses"], audit["confidence"], audit["method"]) == (1000, 100, 0.95, "one_run")
    assert "must not be released" in audit["note"] and "no client record is read" in audit["computed_from"]
    # the canaries were alice's records: her epsilon is that of 1,000 + 1,000 records
    assert json.loads((tmp_path / "privacy_report.json").read_text())["audit"] == audit
    assert json.loads((tmp_path / "results.json").read_text())["audit"] == audit
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert events.Scalars("audit/epsilon_lower_bound")[-1].value == pytest.approx(audit["epsilon_lower_bound"])
    assert events.Scalars("audit/epsilon")[-1].value == pytest.approx(audit["epsilon"])


@pytest.mark.parametrize("engine", ENGINES)
def test_without_dp_the_audit_finds_the_memorized_canaries(tmp_path, engine):
    audit = audited(tmp_path, *POWER, "privacy=none", f"engine={engine}")
    assert audit["epsilon"] is None and audit["epsilon_lower_bound"] >= 1


@pytest.mark.parametrize("engine", ENGINES)
def test_noise_accounted_but_not_added_is_caught_and_the_same_run_with_its_noise_is_not(tmp_path, engine, monkeypatch):
    # a clip that rarely binds, so that only the noise stands between the canaries and the released model
    settings = (*POWER, "privacy.noise_multiplier=20", "privacy.max_grad_norm=100", f"engine={engine}")
    sound = audited(tmp_path / "sound", *settings)
    assert sound["epsilon_lower_bound"] <= sound["epsilon"] < 1

    def no_noise(*args, **kwargs):  # the broken twin: the accountant still counts noise_multiplier=20
        return torch.zeros_like(kwargs.get("reference", kwargs.get("like", args[1] if len(args) > 1 else None)))

    monkeypatch.setattr(opacus.optimizers.optimizer, "_generate_noise", no_noise)
    monkeypatch.setattr(fl_dp_lightning.runtime.vectorized.engine, "gaussian_noise", no_noise)
    broken = audited(tmp_path / "broken", *settings)
    assert broken["epsilon"] == pytest.approx(sound["epsilon"])  # the same printed epsilon
    assert broken["epsilon_lower_bound"] > broken["epsilon"]
