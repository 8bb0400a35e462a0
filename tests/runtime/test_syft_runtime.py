"""Clients as PySyft datasites (client.runtime=syft) against the local runtime, the owner's approval and the mock.

PySyft 0.9.5 pins its own numpy, so these run in their own environment: ``make syft-test`` (CI runs it). In the
main environment only the refusal without PySyft runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_dp_lightning import ConfigError, FederatedDataModule, FederatedDPStrategy, LitClassifier, PrivacyConfig
from fl_dp_lightning.config import SyftConfig
from fl_dp_lightning.data.sources import load_synthetic
from fl_dp_lightning.privacy.report import SYFT_REPLY, privacy_report

from ..conftest import make_trainer

SEEDED = PrivacyConfig(noise_multiplier=1.0, unsafe_seeded_randomness=True)
CLIENTS = ["alice", "bob"]


def syft_installed() -> bool:
    try:
        import syft  # noqa: F401
    except ImportError:
        return False
    return True


needs_syft = pytest.mark.skipif(not syft_installed(), reason="PySyft runs in its own venv: make syft-test")


def fit(syft: SyftConfig | None, rounds: int = 2, owner=None, checkpoints=None, resume=None, **strategy_kwargs):
    """The seed workload's loop, small: two clients of 300 synthetic images, the seed CNN, seeded DP-SGD.
    ``owner(strategy)`` runs in a thread beside the training: the datasites' owners answering requests."""
    source = load_synthetic(train_size=600, test_size=100, seed=3)
    torch.manual_seed(0)
    module = LitClassifier(lr=0.05)
    datamodule = FederatedDataModule(train=source.train, test=source.test, clients=CLIENTS, batch_size=32)
    strategy = FederatedDPStrategy(
        privacy=SEEDED, engine="vectorized", syft=syft, seed=5, log_rounds=False, **strategy_kwargs
    )
    if owner is not None:
        threading.Thread(target=owner, args=(strategy,), daemon=True).start()
    saving = {} if checkpoints is None else {"enable_checkpointing": True, "callbacks": [checkpoints]}
    make_trainer(strategy, rounds, limit_val_batches=0, **saving).fit(module, datamodule, ckpt_path=resume)
    return module, strategy


def answer_requests(strategy, answer, seconds: float = 120) -> None:
    """Acts as every datasite's owner: ``answer(site, request)`` for each pending request, until ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for site in list(strategy.datasites.values()):
            for request in site.owner.requests:
                if str(request.status).endswith("PENDING"):
                    answer(site, request)
        time.sleep(0.1)


def assert_same_run(local, remote) -> None:
    (local_module, local_strategy), (remote_module, remote_strategy) = local, remote
    for key, value in local_module.state_dict().items():
        torch.testing.assert_close(remote_module.state_dict()[key], value, atol=1e-5, rtol=0)
    assert remote_strategy.epsilons() == pytest.approx(local_strategy.epsilons(), abs=1e-9)
    assert all(eps > 0 for eps in remote_strategy.epsilons().values())


def test_without_pysyft_the_runtime_is_refused_naming_the_extra_and_the_make_target():
    if syft_installed():
        pytest.skip("PySyft is installed here")
    with pytest.raises(ConfigError, match=r"client.runtime=syft needs PySyft.*make syft-test.*\.\[syft\]"):
        FederatedDPStrategy(privacy=SEEDED, engine="vectorized", syft=SyftConfig())


@needs_syft
def test_datasites_in_process_train_the_same_rounds_as_the_local_runtime():
    remote = fit(SyftConfig())
    assert_same_run(fit(None), remote)
    report = privacy_report(remote[1])  # what a datasite's reply carries, and PySyft's error channel
    assert SYFT_REPLY in report["released"] and any("PySyft hands" in item for item in report["not_covered"])


@needs_syft
def test_datasites_behind_loopback_servers_train_the_same_rounds_as_the_local_runtime():
    assert_same_run(fit(None), fit(SyftConfig(port=18231)))


@needs_syft
def test_a_new_approval_every_round_changes_nothing_but_the_requests():
    _, strategy = remote = fit(SyftConfig(approved_rounds=1), rounds=3)
    assert_same_run(fit(None, rounds=3), remote)
    assert {name: site.approvals for name, site in strategy.datasites.items()} == {"alice": 3, "bob": 3}


@needs_syft
def test_datasites_asked_in_parallel_never_parse_submitted_code_at_once(monkeypatch):
    # ast.parse in two threads at once fails on CPython < 3.11.8 (gh-106905); PySyft parses every submission
    import ast

    parse, active, overlaps = ast.parse, [0], []

    def watched(*args, **kwargs):
        active[0] += 1
        overlaps.append(active[0])
        time.sleep(0.05)  # widens the window two unserialized submissions would share
        try:
            return parse(*args, **kwargs)
        finally:
            active[0] -= 1

    monkeypatch.setattr(ast, "parse", watched)
    fit(SyftConfig(), rounds=1)
    assert overlaps and max(overlaps) == 1


@needs_syft
def test_the_server_reads_only_the_mock_and_the_private_records_stay_in_the_datasite():
    from fl_dp_lightning.runtime.syft.clients import Datasite

    source = load_synthetic(train_size=50, test_size=10, seed=3)
    site = Datasite("carol", source.train, port=None)
    try:
        asset = site.scientist.datasets[0].assets[0]
        private = source.train.tensors[0].numpy()
        assert not isinstance(asset.data, dict)  # the data scientist's client is refused the private asset
        mock = asset.mock
        assert mock["x"].shape == private.shape and not np.allclose(mock["x"], private)
        assert isinstance(site.owner.datasets[0].assets[0].data, dict)  # the owner can read it
    finally:
        site.close()


@needs_syft
def test_a_request_the_owner_denies_drops_that_client_with_the_reason_and_the_other_trains():
    def deny_alice(site, request):
        if site.name == "alice":
            request.deny(reason="not on this data")
        else:
            request.approve()

    _, strategy = fit(
        SyftConfig(approval="manual", timeout_s=60), rounds=1, owner=lambda s: answer_requests(s, deny_alice)
    )
    (fault,) = strategy.faults
    assert fault["client"] == "alice" and "denied" in fault["reason"]
    assert [r.client for r in strategy.last_round if not r.dropped] == ["bob"]


@needs_syft
def test_a_denied_request_stops_the_run_in_one_line_when_failures_raise():
    def deny(site, request):
        request.deny(reason="no")

    with pytest.raises(ConfigError, match=r"client 'alice': the owner of datasite 'alice' denied .*on_failure=raise"):
        fit(
            SyftConfig(approval="manual", timeout_s=60),
            rounds=1,
            owner=lambda s: answer_requests(s, deny),
            on_client_failure="raise",
        )


@needs_syft
def test_an_owner_who_does_not_answer_in_time_drops_the_client():
    _, strategy = fit(SyftConfig(approval="manual", timeout_s=2), rounds=1)
    assert {f["client"] for f in strategy.faults} == {"alice", "bob"}
    assert all("did not answer within" in f["reason"] for f in strategy.faults)


@needs_syft
def test_train_py_runs_through_datasites_and_the_benchmark_compares_the_runtimes(tmp_path):
    out = tmp_path / "syft_runtime.json"
    benchmark = Path(__file__).resolve().parents[2] / "benchmarks" / "syft_runtime.py"
    subprocess.run(
        [sys.executable, str(benchmark), "--quick", "--rounds", "2", "--out", str(out)],
        check=True, capture_output=True, timeout=900,
    )  # fmt: skip
    results = json.loads(out.read_text())["results"]
    assert len(results) == 3
    spent = {name: [row["epsilon_max"] for row in r["history"]] for name, r in results.items()}
    assert len({tuple(eps) for eps in spent.values()}) == 1  # the same accounting whichever runtime
    assert all(0 <= r["history"][-1]["val/acc"] <= 1 for r in results.values())
    assert out.with_suffix(".md").read_text().startswith("| clients (synthetic")


@needs_syft
def test_a_round_that_reached_the_datasite_but_did_not_answer_is_counted(monkeypatch):
    # the datasite may have trained: the server's epsilon must not read below what the datasite spent
    from fl_dp_lightning.runtime.syft.clients import ClientFailure, Datasite

    def lost(self, request, quote_errors):
        raise ClientFailure(f"datasite {self.name!r} failed: (message withheld: it may quote private data)")

    monkeypatch.setattr(Datasite, "run", lost)
    _, strategy = fit(SyftConfig(), rounds=1)
    _, local = fit(None, rounds=1)
    assert {f["client"] for f in strategy.faults} == set(CLIENTS)
    assert strategy.epsilons() == pytest.approx(local.epsilons(), abs=1e-9)  # one round's worth, each


@needs_syft
@pytest.mark.parametrize("quote_errors", [True, False], ids=["quoted", "withheld"])
def test_a_datasite_server_error_drops_the_client_instead_of_ending_the_run(quote_errors):
    # PySyft raises a server's failure in the caller: it becomes the client's failure, handled as a drop
    from types import SimpleNamespace

    import syft

    from fl_dp_lightning.runtime.syft.clients import ClientFailure, Datasite

    def failing(**kwargs):
        raise syft.SyftException(public_message="Something unexpected happened server side")

    site = object.__new__(Datasite)
    sent = SimpleNamespace(send=lambda client: "sent")
    site.sy = SimpleNamespace(ActionObject=SimpleNamespace(from_obj=lambda obj: sent), SyftException=syft.SyftException)
    site.name, site.function, site.asset = "carol", "round", None
    site.scientist = SimpleNamespace(code=SimpleNamespace(round=failing))
    expected = "unexpected happened server side" if quote_errors else "message withheld"
    with pytest.raises(ClientFailure, match=f"datasite 'carol' failed: .*{expected}"):
        site.run({}, quote_errors)


@needs_syft
def test_a_resumed_run_continues_each_datasites_accounting(tmp_path):
    # new datasites after a restart start from the spent privacy the checkpoint carries (written into the terms
    # their owners approve): epsilon goes on from where it was, it does not restart at zero
    from lightning.pytorch.callbacks import ModelCheckpoint

    _, uninterrupted = fit(None, rounds=3)
    fit(SyftConfig(), rounds=1, checkpoints=ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0))
    _, resumed = fit(
        SyftConfig(), rounds=3, checkpoints=ModelCheckpoint(dirpath=tmp_path), resume=tmp_path / "last.ckpt"
    )
    assert resumed.epsilons() == pytest.approx(uninterrupted.epsilons(), abs=1e-9)
    assert {name: c.steps_taken for name, c in resumed.clients.items()} == {
        name: c.steps_taken for name, c in uninterrupted.clients.items()
    }


@needs_syft
def test_pysyfts_default_login_is_refused_and_the_scientist_reads_nothing_of_the_private_asset():
    from fl_dp_lightning.runtime.syft.clients import PYSYFT_DEFAULT_LOGIN, Datasite

    source = load_synthetic(train_size=50, test_size=10, seed=3)
    site = Datasite("dave", source.train, port=None)
    try:
        with pytest.raises(Exception):  # noqa: B017 (PySyft raises its own exception types)
            attempt = site.server.login(email=PYSYFT_DEFAULT_LOGIN[0], password=PYSYFT_DEFAULT_LOGIN[1])
            assert not hasattr(attempt, "datasets"), "the default login still opens the datasite"
        asset = site.scientist.datasets[0].assets[0]
        assert not isinstance(asset.data, dict)  # the data scientist's account is refused the private asset
        assert site.scientist.account.role.name != "ADMIN"
    finally:
        site.close()


class RoundOneProbe:
    """A callback that, after round 1, acts as a curious server process: it clears the datasites' registry in
    its own process (which reset the approved-round count of in-process datasites) and scans its own memory for
    any of the clients' records."""

    def __init__(self, fingerprints: list[bytes]) -> None:
        self.fingerprints, self.found, self.registry = fingerprints, None, None

    def __call__(self):
        from lightning.pytorch.callbacks import Callback

        probe = self

        class Probe(Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                if trainer.current_epoch != 0:
                    return
                from fl_dp_lightning.runtime.syft import datasite

                probe.registry = len(datasite._SITES)
                datasite._SITES.clear()
                probe.found = len(live_records(probe.fingerprints))

        return Probe()


def live_records(fingerprints: list[bytes]) -> list:
    """Every tensor or array alive in this process that holds fingerprinted records: the objects the garbage
    collector tracks, and what they refer to (numpy arrays are not tracked themselves)."""
    import gc

    seen, found = set(), []
    for obj in gc.get_objects():
        for candidate in (obj, *gc.get_referents(obj)):
            if id(candidate) not in seen:
                seen.add(id(candidate))
                if holds_records(candidate, fingerprints):
                    found.append(candidate)
    return found


def holds_records(obj, fingerprints: list[bytes]) -> bool:
    """Whether ``obj`` (a tensor or an array) starts with one of the records fingerprinted."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() != 4 or obj.shape[1:] != (1, 28, 28) or obj.dtype != torch.float32 or obj.device.type != "cpu":
            return False
        first = obj[:1].contiguous().numpy().tobytes()
    elif isinstance(obj, np.ndarray):
        if obj.ndim != 4 or obj.shape[1:] != (1, 28, 28) or obj.dtype != np.float32:
            return False
        first = np.ascontiguousarray(obj[:1]).tobytes()
    else:
        return False
    return first in fingerprints


def probe_run(port: int | None) -> dict:
    """Two rounds through datasites, approved one round at a time, with the curious server process's probe after
    round 1 (run in a fresh process: earlier runs of a test session leave their own records behind)."""
    source = load_synthetic(train_size=600, test_size=100, seed=3)
    shares = FederatedDataModule(train=source.train, test=source.test, clients=CLIENTS, batch_size=32)
    shares.setup("fit")
    fingerprints = [ds.tensors[0][:1].contiguous().numpy().tobytes() for ds in shares.client_datasets.values()]
    del shares, source
    probe = RoundOneProbe(fingerprints)
    _, strategy = fit(SyftConfig(port=port, approved_rounds=1), rounds=2, checkpoints=probe())
    report = privacy_report(strategy)
    return {
        "registry": probe.registry,
        "found": probe.found,
        "approvals": {name: site.approvals for name, site in strategy.datasites.items()},
        "syft": report["syft"],
        "faults": report["faults"],
    }


@needs_syft
@pytest.mark.parametrize("port", [18251, None], ids=["loopback_servers", "in_process"])
def test_with_loopback_servers_the_server_process_holds_no_record_and_cannot_reset_a_round_limit(port):
    for _attempt in range(2):  # PySyft 0.9.5's servers now and then fail a call: that client drops out, run again
        run = subprocess.run(
            [sys.executable, "-c", f"import json; from tests.runtime.test_syft_runtime import probe_run; "
             f"print('RESULT', json.dumps(probe_run({port})))"],
            cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        assert run.returncode == 0 and lines, run.stderr[-2000:]
        result = json.loads(lines[-1][len("RESULT ") :])
        if not result["faults"]:
            break
    assert result["faults"] == [], result["faults"]
    if port is not None:
        assert result["registry"] == 0 and result["found"] == 0  # no client state, no record in the server process
        assert result["approvals"] == {"alice": 2, "bob": 2}  # the used approval was refused by the datasite
        assert result["syft"]["mode"].startswith("loopback servers")
    else:  # power, and what the in-process simulation is documented not to isolate
        assert result["registry"] == 2 and result["found"] > 0
        assert result["approvals"] == {"alice": 1, "bob": 1}  # the reset let a used-up approval train again
        assert result["syft"]["isolation"].startswith("none: a single-process simulation")


@needs_syft
def test_the_audit_through_datasites_is_sound_and_catches_noise_accounted_but_not_added(tmp_path, monkeypatch):
    import fl_dp_lightning.runtime.vectorized.engine
    from fl_dp_lightning.cli import run

    from ..config.test_config import composed

    settings = ["data=synthetic", "client.runtime=syft", "engine=vectorized", "trainer.progress_bar=false"]
    # input canaries: Dirac ones join the steps inside an engine, out of reach in a datasite (refused there)
    settings += ["trainer.rounds=15", "audit=one_run", "audit.canary=input", "audit.canaries=100", "audit.guesses=20"]
    settings += ["privacy.noise_multiplier=20", "privacy.max_grad_norm=100"]
    sound = run(composed(*settings), tmp_path / "sound")["audit"]
    assert sound["epsilon_lower_bound"] <= sound["epsilon"] < 1
    # the broken twin: the datasites (in this process) add no noise while accounting noise_multiplier=20
    monkeypatch.setattr(fl_dp_lightning.runtime.vectorized.engine, "gaussian_noise", lambda s, like, *a: 0 * like)
    broken = run(composed(*settings), tmp_path / "broken")["audit"]
    assert broken["epsilon"] == pytest.approx(sound["epsilon"]) and broken["epsilon_lower_bound"] > broken["epsilon"]
