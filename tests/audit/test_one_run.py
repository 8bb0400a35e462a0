"""The one-run audit through ``train.py``'s run(): sound where the mechanism is, with power where it is not.

Each test trains for real with canaries among alice's records and reads only the released global model (and,
for Dirac canaries, the public initial one). Each broken twin changes the mechanism, never the accountant or the
audit, so the printed epsilon stays what it was while what is released leaks more: the audit must catch it."""

from __future__ import annotations

import json

import opacus.optimizers.optimizer
import pytest
import torch
from opacus.optimizers import DPOptimizer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import fl_dp_lightning.runtime.vectorized.dpsgd
import fl_dp_lightning.runtime.vectorized.engine
import fl_dp_lightning.server.user_level
from fl_dp_lightning.cli import run

from ..config.test_config import composed

ENGINES = ["opacus", "vectorized"]
DIRAC = ("data=synthetic", "trainer.rounds=3", "audit=one_run")
# 15 rounds is where a model trained without DP on these records has memorized its input canaries (20 of 20)
INPUT_POWER = ("data=synthetic", "trainer.rounds=15", "audit=one_run", "audit.canary=input")
INPUT_POWER += ("audit.canaries=100", "audit.guesses=20")
pytestmark = pytest.mark.filterwarnings("ignore:The number of training batches")


def audited(tmp_path, *overrides: str) -> dict:
    return run(composed(*overrides, "trainer.progress_bar=false"), tmp_path)["audit"]


@pytest.mark.parametrize("engine", ENGINES)
def test_the_seed_mechanism_audited_gives_a_bound_at_or_below_its_printed_epsilon(tmp_path, engine):
    results = run(composed(*DIRAC, f"engine={engine}", "trainer.progress_bar=false"), tmp_path)
    audit = results["audit"]
    assert audit["client"] == "alice" and audit["epsilon"] == results["epsilon"]["alice"]
    assert 0 <= audit["epsilon_lower_bound"] <= audit["epsilon"]
    settings = (audit["canary"], audit["canaries"], audit["guesses"], audit["confidence"], audit["method"])
    assert settings == ("dirac", 1000, 100, 0.95, "one_run")
    assert "must not be released" in audit["note"] and "no client record is read" in audit["computed_from"]
    assert json.loads((tmp_path / "privacy_report.json").read_text())["audit"] == audit
    assert json.loads((tmp_path / "results.json").read_text())["audit"] == audit
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert events.Scalars("audit/epsilon_lower_bound")[-1].value == pytest.approx(audit["epsilon_lower_bound"])
    assert events.Scalars("audit/epsilon")[-1].value == pytest.approx(audit["epsilon"])


@pytest.mark.parametrize("engine", ENGINES)
def test_without_dp_three_rounds_give_a_bound_of_at_least_one(tmp_path, engine):
    audit = audited(tmp_path, *DIRAC, "privacy=none", f"engine={engine}")
    assert audit["epsilon"] is None and audit["epsilon_lower_bound"] >= 1


@pytest.mark.parametrize("engine", ENGINES)
def test_secure_aggregation_and_client_sampling_audited_stay_at_or_below_the_printed_epsilon(tmp_path, engine):
    audit = audited(tmp_path, *DIRAC, "secure_aggregation=on", "client.fraction=0.5", f"engine={engine}")
    assert 0 <= audit["epsilon_lower_bound"] <= audit["epsilon"]


@pytest.mark.parametrize("engine", ENGINES)
def test_input_canaries_are_sound_under_dp_and_memorized_without(tmp_path, engine):
    sound = audited(tmp_path / "dp", "data=synthetic", "trainer.rounds=3", "audit=one_run", "audit.canary=input")
    assert sound["canary"] == "input" and 0 <= sound["epsilon_lower_bound"] <= sound["epsilon"]
    leaky = audited(tmp_path / "none", *INPUT_POWER, "privacy=none", f"engine={engine}")
    assert leaky["epsilon"] is None and leaky["epsilon_lower_bound"] >= 1


def no_noise(*args, **kwargs):
    """Opacus's and the vectorized engine's noise, drawn as zeros: the accountant still counts it."""
    return torch.zeros_like(kwargs.get("reference", kwargs.get("like", args[1] if len(args) > 1 else None)))


@pytest.mark.parametrize("engine", ENGINES)
def test_noise_accounted_but_not_added_is_caught_and_the_same_run_with_its_noise_is_not(tmp_path, engine, monkeypatch):
    settings = (*DIRAC, "privacy.noise_multiplier=20", f"engine={engine}")
    sound = audited(tmp_path / "sound", *settings)
    assert sound["epsilon_lower_bound"] <= sound["epsilon"] < 1
    monkeypatch.setattr(opacus.optimizers.optimizer, "_generate_noise", no_noise)
    monkeypatch.setattr(fl_dp_lightning.runtime.vectorized.engine, "gaussian_noise", no_noise)
    broken = audited(tmp_path / "broken", *settings)
    assert broken["epsilon"] == pytest.approx(sound["epsilon"])  # the same printed epsilon
    assert broken["epsilon_lower_bound"] > broken["epsilon"]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_step_that_skips_clipping_while_the_noise_assumes_it_is_caught(tmp_path, engine, monkeypatch):
    # the sensitivity the noise is scaled for (the clip norm) is not the sensitivity of what is released: the
    # class of bug of a count accounted at half its sensitivity
    settings = (*DIRAC, "privacy.noise_multiplier=3", f"engine={engine}")
    sound = audited(tmp_path / "sound", *settings)
    assert sound["epsilon_lower_bound"] <= sound["epsilon"]
    unclipped = DPOptimizer.clip_and_accumulate

    def clip_and_accumulate(self):  # clips at a norm nothing bounds; add_noise still reads the real one
        real, self.max_grad_norm = self.max_grad_norm, float("inf")
        unclipped(self)
        self.max_grad_norm = real

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", clip_and_accumulate)
    monkeypatch.setattr(fl_dp_lightning.runtime.vectorized.dpsgd, "clip_factors", lambda norms, bound: norms * 0 + 1)
    broken = audited(tmp_path / "broken", *settings)
    assert broken["epsilon"] == pytest.approx(sound["epsilon"])
    assert broken["epsilon_lower_bound"] > broken["epsilon"]


# user-level DP, audited with canary clients: 100 clients of 20 records, each canary a client of its own
USER = ("data=synthetic", "trainer.rounds=3", "audit=one_run", "privacy=none", "client.count=100")
USER += ("trainer.batch_size=10", "user_privacy=dpfedavg", "user_privacy.clip=0.1")
USER_SETTINGS = {
    "fixed clip": (),
    "adaptive clip": ("user_privacy.adaptive_clipping=true",),
    "poisson clients, empty rounds": ("client.sampling=poisson", "client.fraction=0.02"),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("setting", USER_SETTINGS)
def test_user_level_dp_audited_with_canary_clients_stays_at_or_below_its_printed_epsilon(tmp_path, engine, setting):
    results = run(composed(*USER, *USER_SETTINGS[setting], f"engine={engine}", "trainer.progress_bar=false"), tmp_path)
    audit = results["audit"]
    assert audit["client"] == "canary clients (user-level DP)" and audit["epsilon"] == results["user_epsilon"]
    assert 0 <= audit["epsilon_lower_bound"] <= audit["epsilon"]


@pytest.mark.parametrize("engine", ENGINES)
def test_user_level_noise_accounted_but_not_added_is_caught(tmp_path, engine, monkeypatch):
    settings = (*USER, "user_privacy.noise_multiplier=5", f"engine={engine}")
    sound = audited(tmp_path / "sound", *settings)
    assert sound["epsilon_lower_bound"] <= sound["epsilon"] < 2
    noised_mean = fl_dp_lightning.server.user_level.noised_mean
    monkeypatch.setattr(
        fl_dp_lightning.server.user_level, "noised_mean", lambda summed, **k: noised_mean(summed, **k | {"clip": 0})
    )
    broken = audited(tmp_path / "broken", *settings)
    assert broken["epsilon"] == pytest.approx(sound["epsilon"]) and broken["epsilon_lower_bound"] > broken["epsilon"]


@pytest.mark.parametrize("engine", ENGINES)
def test_user_level_updates_left_unclipped_while_the_noise_assumes_the_clip_are_caught(tmp_path, engine, monkeypatch):
    settings = (*USER, "user_privacy.noise_multiplier=5", f"engine={engine}")
    clip_update = fl_dp_lightning.server.user_level.clip_update
    monkeypatch.setattr(fl_dp_lightning.server.user_level, "clip_update", lambda update, clip: clip_update(update, 1e9))
    broken = audited(tmp_path, *settings)
    assert broken["epsilon_lower_bound"] > broken["epsilon"]


@pytest.mark.parametrize("engine", ENGINES)
def test_the_audit_drops_into_a_users_trainer_as_a_callback(synthetic, engine):
    from fl_dp_lightning import FederatedDataModule, FederatedDPStrategy, PrivacyConfig
    from fl_dp_lightning.audit import OneRunAudit
    from fl_dp_lightning.config import AuditConfig

    from ..conftest import make_trainer
    from ..strategy.test_strategy import small_classifier

    results = {}
    for privacy in (PrivacyConfig(), PrivacyConfig(enabled=False)):
        audit = OneRunAudit(AuditConfig(method="one_run", canaries=200, guesses=40, client="client_1"))
        module = small_classifier()
        datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=2, batch_size=20)
        strategy = FederatedDPStrategy(privacy=privacy, engine=engine)
        make_trainer(strategy, 3, callbacks=[audit]).fit(module, datamodule)
        epsilon = strategy.epsilons()[audit.client]
        results[privacy.enabled] = audit.result(module, epsilon=epsilon, delta=privacy.delta)
    private = results[True]
    assert private["client"] == "client_1" and 0 <= private["epsilon_lower_bound"] <= private["epsilon"]
    assert results[False]["epsilon"] is None and results[False]["epsilon_lower_bound"] >= 1
