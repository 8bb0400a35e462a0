"""The trust boundary: every logged tag, printed line, report field and checkpoint entry of a run comes from a
ClientUpdate, a ClientRecord or public data, under each engine; a value computed from a client's records without
noise (a canary logged from ``training_step``) appears in none of them."""

from __future__ import annotations

import json
import re

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from fl_dp_lightning import FederatedDataModule, FederatedDPStrategy, LitClassifier, PrivacyConfig
from fl_dp_lightning.privacy.report import privacy_report
from fl_dp_lightning.update import ClientRecord, ClientUpdate

from ..conftest import RecordingLogger, make_trainer

CANARY = 4242.4242
PRINTED = re.compile(r"^\[(\w+)\] round (\d+)/(\d+)  ε = ([\d.]+) \(δ = 1e-05\)$")
PUBLIC_TAGS = re.compile(r"^(privacy/epsilon/\w+|privacy/epsilon_max|val/\w+|epoch)$")


class LogsACanary(LitClassifier):
    """Logs a value only a client's records could give (under the Opacus engine, where training_step runs)."""

    def training_step(self, batch, batch_idx):
        self.log("canary", CANARY)
        return super().training_step(batch, batch_idx)


class RecordsEachRound(Callback):
    """The server's public view of every client after each round, and the round's released updates."""

    def __init__(self) -> None:
        self.records: list[dict[str, ClientRecord]] = []
        self.updates: list[list[ClientUpdate]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.records.append(trainer.strategy.records())
        self.updates.append(list(trainer.strategy.last_round))


@pytest.mark.parametrize("engine", ["opacus", "vectorized"])
def test_everything_a_run_releases_comes_from_client_updates_records_or_public_data(synthetic, caplog, engine):
    torch.manual_seed(0)
    seen, logger = RecordsEachRound(), RecordingLogger()
    strategy = FederatedDPStrategy(privacy=PrivacyConfig(noise_multiplier=1.0), engine=engine)
    trainer = make_trainer(strategy, 2, logger=logger, callbacks=[seen])
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=["a", "b"], batch_size=40)
    with caplog.at_level("INFO"):
        trainer.fit(LogsACanary(lr=0.05), datamodule)

    # what crossed: one frozen update per client and round, its weights in the average, no unnoised metric
    for round_no, updates in enumerate(seen.updates, start=1):
        assert [(u.client, u.round) for u in updates] == [("a", round_no), ("b", round_no)]
        for update, record in zip(updates, seen.records[round_no - 1].values()):
            assert update.params is None and update.metrics == {} and update.failure is None
            assert update.num_examples == record.num_examples and update.steps > 0
    with pytest.raises(AttributeError):
        seen.updates[0][0].metrics = {"loss": 1.0}  # frozen

    # logged: public tags only, and each epsilon is the record's
    for step, metrics in logger.records:
        for tag, value in metrics.items():
            assert PUBLIC_TAGS.match(tag), tag
            assert value != pytest.approx(CANARY)
            if tag.startswith("privacy/epsilon/"):
                assert value == seen.records[step][tag.rsplit("/", 1)[1]].epsilon
    assert logger.series("privacy/epsilon/a")

    # printed: each client's line carries its record's epsilon and nothing else
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[")]
    assert len(lines) == 4
    for line in lines:
        name, round_no, _, epsilon = PRINTED.match(line).groups()
        assert float(epsilon) == pytest.approx(seen.records[int(round_no) - 1][name].epsilon, abs=0.006)
    assert not any(str(CANARY) in r.getMessage() for r in caplog.records)

    # report: each client's row is its record
    report = privacy_report(strategy)
    final = seen.records[-1]
    for name, row in report["clients"].items():
        record = final[name]
        assert row == {
            "epsilon": record.epsilon,
            "delta": 1e-5,
            "noise_multiplier": record.noise_multiplier,
            "max_grad_norm": record.max_grad_norm,
            "batch_size": record.batch_size,
            "local_epochs": record.local_epochs,
            "sample_rate": record.sample_rate,
            "steps": record.steps_taken,
            "num_examples": record.num_examples,
        }
    assert str(CANARY) not in json.dumps(report, default=str)

    # checkpoint: a client's entry is its record's accountant, noise, rate and steps (no stream, no data)
    for name, state in strategy.state_dict()["clients"].items():
        assert set(state) == {"accountant", "noise_multiplier", "sample_rate", "steps_taken"}
        record = final[name]
        assert (state["noise_multiplier"], state["sample_rate"], state["steps_taken"]) == (
            record.noise_multiplier,
            record.sample_rate,
            record.steps_taken,
        )
        assert tuple(tuple(entry) for entry in state["accountant"]["history"]) == record.history
