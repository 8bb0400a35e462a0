"""Clients that fail: one that raises, or runs past its time limit, leaves the round; the round averages the
others; the privacy it spent stays counted; the event is logged and reported. Or the run fails, by option."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest
import torch

from fl_dp_lightning import ConfigError, FederatedDataModule, FederatedDPStrategy, PrivacyConfig, checkpoint, cli
from fl_dp_lightning.server.aggregate import RunningAverage, fedavg

from ..conftest import make_trainer
from ..strategy.test_strategy import UnawareModule, weights


class FailsFor(UnawareModule):
    """Raises (or stalls) on the chosen client's third step of the first round, like a flaky device."""

    def __init__(self, client: str, stall: float = 0.0) -> None:
        super().__init__()
        self.client, self.stall, self.steps = client, stall, 0

    def training_step(self, batch, batch_idx):
        strategy = self.trainer.strategy
        if strategy.current_client == self.client and self.trainer.current_epoch == 0:
            self.steps += 1
            if self.steps == 3:
                if not self.stall:
                    raise OSError("device went away")
                time.sleep(self.stall)
        return super().training_step(batch, batch_idx)


def fit(synthetic, module, **strategy_kwargs):
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=["a", "b", "c"], batch_size=40)
    strategy = FederatedDPStrategy(privacy=PrivacyConfig(), **strategy_kwargs)
    trainer = make_trainer(strategy, 1, limit_val_batches=0)
    trainer.fit(module, datamodule)
    return trainer, strategy


def test_a_client_that_raises_is_dropped_the_round_reweighted_and_its_privacy_counted(synthetic, monkeypatch, caplog):
    added = []
    real_add = RunningAverage.add

    def record(self, state, weight, client=None):
        added.append(({k: v.detach().clone() for k, v in state.items()}, weight))
        real_add(self, state, weight, client)

    monkeypatch.setattr(RunningAverage, "add", record)
    module = FailsFor("b")
    with caplog.at_level("INFO"):
        trainer, strategy = fit(synthetic, module)
    assert len(added) == 2 and [w for _, w in added] == [400, 400]  # a and c; b left out
    expected = fedavg([s for s, _ in added], [w for _, w in added])
    for key, value in weights(module).items():
        if key in expected and key.startswith("body"):
            assert torch.allclose(value, expected[key], atol=1e-6), key
    b = strategy.clients["b"]
    assert b.steps_taken == 3 and sum(s for _, _, s in b.accountant.history) == 3  # 2 steps + the failing one
    assert strategy.epsilons()["b"] > 0
    # under DP the error's message stays on the client (it may quote records); its type is reported
    reason = "OSError (message withheld: it may quote private data)"
    assert strategy.faults == [{"round": 1, "client": "b", "reason": reason}]
    assert f"client 'b' is dropped from this round ({reason})" in caplog.text
    assert "device went away" not in caplog.text
    report = json.loads((Path(trainer.default_root_dir) / "privacy_report.json").read_text())
    assert report["faults"] == strategy.faults and report["clients"]["b"]["steps"] == 3
    assert any(line.startswith("which client failed in which round") for line in report["not_covered"])


def test_a_client_past_its_time_limit_is_dropped(synthetic):
    _, strategy = fit(synthetic, FailsFor("c", stall=4.0), client_time_limit=2.0)
    assert [f["client"] for f in strategy.faults] == ["c"] and "time limit of 2 s" in strategy.faults[0]["reason"]
    assert strategy.clients["c"].steps_taken == 3 < strategy.clients["a"].steps_taken


def test_a_time_limit_under_on_client_failure_raise_stops_the_run(synthetic):
    with pytest.raises(
        ConfigError, match=r"client.time_limit_s=2: a client ran past the time limit .*on_failure=raise"
    ):
        fit(synthetic, FailsFor("c", stall=4.0), client_time_limit=2.0, on_client_failure="raise")


class AlwaysFails(UnawareModule):
    """Fails on every client's first step: a module that cannot train on the clients' data."""

    def __init__(self, **hparams) -> None:
        super().__init__()

    def training_step(self, batch, batch_idx):
        if self.trainer.training and self.trainer.strategy._loop.client is not None:
            raise ValueError("cannot train on this")
        return super().training_step(batch, batch_idx)


def test_a_train_py_run_in_which_no_client_ever_finished_exits_non_zero(capsys, tmp_path):
    conf = cli.compose_overrides(
        [
            "data=synthetic",
            "trainer.progress_bar=false",
            "trainer.rounds=2",
            "model._target_=tests.runtime.test_faults.AlwaysFails",
        ]
    )
    with pytest.raises(SystemExit) as stopped:
        cli.main(conf, run_dir=tmp_path / "run")
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "error: no client finished any of the 2 round(s): every client failed" in err
    assert not (tmp_path / "run" / "results.json").exists()


def test_with_on_client_failure_raise_the_run_fails(synthetic):
    with pytest.raises(OSError, match="device went away"):
        fit(synthetic, FailsFor("a"), on_client_failure="raise")


def test_a_fault_on_another_process_reaches_rank_zeros_report(synthetic, tmp_path):
    from fl_dp_lightning.strategy.distributed import DistributedFederatedDPStrategy

    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=["a", "b", "c"], batch_size=40)
    strategy = DistributedFederatedDPStrategy(
        privacy=PrivacyConfig(), start_method="spawn", process_group_backend="gloo"
    )
    trainer = make_trainer(strategy, 1, devices=2, limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(FailsFor("b"), datamodule)  # client b belongs to rank 1 (client i trains on rank i % 2)
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert [(f["round"], f["client"]) for f in report["faults"]] == [(1, "b")]
    assert any(line.startswith("which client failed in which round") for line in report["not_covered"])


def test_faults_are_kept_in_checkpoints_and_reported_after_a_resume(synthetic, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(rounds, ckpt_path=None):
        datamodule = FederatedDataModule(
            train=synthetic.train, test=synthetic.test, clients=["a", "b", "c"], batch_size=40
        )
        strategy = FederatedDPStrategy(privacy=PrivacyConfig())
        checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
        trainer = make_trainer(strategy, rounds, limit_val_batches=0, enable_checkpointing=True, callbacks=[checkpoint])
        trainer.fit(FailsFor("b"), datamodule, ckpt_path=ckpt_path)
        return strategy

    run(1)
    resumed = run(2, ckpt_path=tmp_path / "last.ckpt")
    assert [(f["round"], f["client"]) for f in resumed.faults] == [(1, "b")]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["full_disk", "read_only"])
def test_a_run_folder_that_cannot_take_a_checkpoint_ends_in_one_line_with_the_last_one_intact(
    capsys, tmp_path, monkeypatch, code
):
    """The second round's checkpoint write fails as a full disk or a read-only folder makes it fail."""
    real_save, calls = checkpoint.torch.save, []

    def save(obj, f):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(code, os.strerror(code))
        real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    conf = cli.compose_overrides(["data=synthetic", "trainer.progress_bar=false", "trainer.rounds=2"])
    with pytest.raises(SystemExit) as stopped:
        cli.main(conf, run_dir=tmp_path / "run")
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    folder = tmp_path / "run" / "checkpoints"
    assert err[-1] == (
        f"error: cannot write last.ckpt in {folder}: {os.strerror(code)}; free space there or choose a writable run "
        "folder (hydra.run.dir=...); the previous last.ckpt there is intact"
    )
    assert not any("Traceback" in line for line in err)
    kept = torch.load(folder / "last.ckpt", weights_only=True)
    assert kept["fl_dp_lightning"]["rounds_trained"] == 1 and not list(folder.glob(".*.tmp"))
