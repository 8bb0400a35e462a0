"""Per-client settings: each client's batch size, local epochs, noise and clip reach its DP optimizer and its
accountant (epsilon equals a direct computation from that client's own settings), and the report lists them."""

from __future__ import annotations

import json

import pytest
from opacus.optimizers import DPOptimizer

from fl_dp_lightning import ClientConfig, ConfigError, FederatedDPStrategy, PrivacyConfig
from fl_dp_lightning.config import ClientOverride

from ..config.test_config import composed
from ..conftest import direct_epsilon


def test_per_client_overrides_reach_each_clients_dp_optimizer_and_accountant(tmp_path, monkeypatch):
    from fl_dp_lightning.cli import run

    seen = {}
    real_clip = DPOptimizer.clip_and_accumulate

    def spy(self):
        client = self._fl_strategy.current_client
        seen.setdefault(client, (self.max_grad_norm, self.noise_multiplier, self.expected_batch_size))
        return real_clip(self)

    real_begin = FederatedDPStrategy._begin_client

    def begin(self, client):
        real_begin(self, client)
        self._loop.optimizer._fl_strategy = self

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", spy)
    monkeypatch.setattr(FederatedDPStrategy, "_begin_client", begin)
    conf = composed(
        "data=synthetic",
        "trainer.rounds=2",
        "trainer.batch_size=100",
        "trainer.progress_bar=false",
        "+client.overrides.alice.batch_size=50",
        "+client.overrides.alice.local_epochs=2",
        "+client.overrides.bob.noise_multiplier=2.0",
        "+client.overrides.bob.max_grad_norm=0.5",
    )
    results = run(conf, tmp_path)
    assert seen == {"alice": (1.0, 1.2, 50), "bob": (0.5, 2.0, 100)}
    # alice: q = 50 / 1000, 20 steps per epoch, 2 local epochs, 2 rounds; bob: q = 0.1, 10 steps, 2 rounds
    assert results["epsilon"]["alice"] == pytest.approx(direct_epsilon(0.05, 1.2, 80, 1e-5), rel=1e-9)
    assert results["epsilon"]["bob"] == pytest.approx(direct_epsilon(0.1, 2.0, 20, 1e-5), rel=1e-9)
    rows = json.loads((tmp_path / "privacy_report.json").read_text())["clients"]
    assert (rows["alice"]["batch_size"], rows["alice"]["local_epochs"], rows["alice"]["steps"]) == (50, 2, 80)
    assert (rows["bob"]["noise_multiplier"], rows["bob"]["max_grad_norm"]) == (2.0, 0.5)


def test_overrides_for_unknown_clients_or_fighting_a_target_are_refused():
    with pytest.raises(ConfigError, match=r"client.overrides=\['carol'\]: no such client"):
        ClientConfig(overrides={"carol": ClientOverride(batch_size=8)})
    with pytest.raises(ConfigError, match="client.overrides.\\*.noise_multiplier: privacy.target_epsilon calibrates"):
        FederatedDPStrategy(
            privacy=PrivacyConfig(target_epsilon=3.0), client_overrides={"bob": ClientOverride(noise_multiplier=2.0)}
        )
    with pytest.raises(ConfigError, match="client.overrides.\\*.batch_size=0"):
        ClientOverride(batch_size=0)
