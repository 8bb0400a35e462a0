"""Checkpoints carry the privacy spent: kill-and-resume equals an uninterrupted run, and never repeats noise."""

from __future__ import annotations

import zipfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fl_dp_lightning import ConfigError, FederatedDataModule, FederatedDPStrategy, LitClassifier, PrivacyConfig
from fl_dp_lightning.callbacks import RoundCheckpoint
from fl_dp_lightning.checkpoint import CHECKPOINT_KEY, VerifiedCheckpointIO

from ..conftest import make_trainer
from .test_strategy import small_classifier, weights

PRIVACY = PrivacyConfig(noise_multiplier=1.0)
SEEDED = PrivacyConfig(noise_multiplier=1.0, unsafe_seeded_randomness=True)


def fit(
    synthetic,
    rounds,
    *,
    privacy=PRIVACY,
    ckpt_dir=None,
    ckpt_path=None,
    fraction=1.0,
    datamodule=None,
    module=None,
    sampling="uniform",
    engine="opacus",
):
    pl.seed_everything(0)
    module = module or small_classifier()
    datamodule = datamodule or FederatedDataModule(
        train=synthetic.train, test=synthetic.test, clients=["a", "b", "c"], batch_size=32
    )
    strategy = FederatedDPStrategy(
        privacy=privacy, client_fraction=fraction, client_sampling=sampling, engine=engine, seed=5
    )
    # as train.py keeps it: the last round's checkpoint, written at the round's end
    last = RoundCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, enable_version_counter=False)
    callbacks = [last] if ckpt_dir else []
    trainer = make_trainer(strategy, rounds, enable_checkpointing=bool(ckpt_dir), callbacks=callbacks)
    trainer.fit(module, datamodule, ckpt_path=ckpt_path)
    return module, strategy


@pytest.mark.parametrize("fraction", [1.0, 2 / 3])
def test_kill_after_round_2_and_resume_to_round_5_equals_the_uninterrupted_run(synthetic, tmp_path, fraction):
    # bit-exact only with the public-seed opt-in; by default the accounting is exact and the noise fresh
    for privacy in (SEEDED, PRIVACY):
        folder = tmp_path / str(privacy.unsafe_seeded_randomness)
        full_module, full = fit(synthetic, 5, privacy=privacy, fraction=fraction)
        fit(synthetic, 2, privacy=privacy, ckpt_dir=folder, fraction=fraction)  # the run that was killed after round 2
        resumed_module, resumed = fit(
            synthetic, 5, privacy=privacy, ckpt_dir=folder, ckpt_path=folder / "last.ckpt", fraction=fraction
        )
        assert resumed.epsilons() == full.epsilons()  # exact
        for name in full.clients:
            assert resumed.clients[name].accountant.history == full.clients[name].accountant.history
        same = all(
            torch.allclose(weights(resumed_module)[key], value, atol=1e-6, rtol=0)
            for key, value in weights(full_module).items()
        )
        assert same == privacy.unsafe_seeded_randomness


@pytest.mark.parametrize("engine", ["opacus", "vectorized"])
def test_a_poisson_sampled_run_stopped_after_any_round_resumes_to_the_uninterrupted_runs_epsilons(
    synthetic, tmp_path, engine
):
    """Client sampling by Poisson draws (empty rounds included): stopped after round k and resumed, every client
    ends at the uninterrupted run's epsilon, and with the seeded opt-in at its weights."""
    kwargs = dict(privacy=SEEDED, fraction=0.5, sampling="poisson", engine=engine)
    full_module, full = fit(synthetic, 5, **kwargs)
    drawn = [full._full_plan(r).clients for r in range(5)]
    assert len({tuple(d) for d in drawn}) > 2 and [] in drawn  # power: the draws differ, one round is empty
    for stop in range(1, 5):
        folder = tmp_path / str(stop)
        fit(synthetic, stop, ckpt_dir=folder, **kwargs)
        saved = torch.load(folder / "last.ckpt", weights_only=True)[CHECKPOINT_KEY]
        assert saved["rounds_run"] == stop  # empty rounds saved too
        resumed_module, resumed = fit(synthetic, 5, ckpt_dir=folder, ckpt_path=folder / "last.ckpt", **kwargs)
        assert resumed.epsilons() == full.epsilons(), stop
        for key, value in weights(full_module).items():
            assert torch.allclose(weights(resumed_module)[key], value, atol=1e-6, rtol=0), (stop, key)
        assert not list(folder.glob(".*.tmp"))


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_a_checkpoint_resumed_twice_draws_fresh_noise_and_stores_no_random_state(synthetic, tmp_path):
    fit(synthetic, 1, ckpt_dir=tmp_path)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    for state in checkpoint["fl_dp_lightning"]["clients"].values():
        assert set(state) == {
            "accountant",
            "noise_multiplier",
            "sample_rate",
            "steps_taken",
        }  # no generator state, no seed
    forks = [fit(synthetic, 2, ckpt_path=tmp_path / "last.ckpt")[0] for _ in range(2)]
    # the same checkpoint, the same data: only the noise and the sampling can differ, and they must
    diff = max((weights(forks[0])[k] - weights(forks[1])[k]).abs().max().item() for k in weights(forks[0]))
    assert diff > 1e-4


def test_resuming_a_target_epsilon_run_past_its_planned_rounds_is_refused_with_the_epsilon_it_would_reach(
    synthetic, tmp_path
):
    target = PrivacyConfig(target_epsilon=2.0)
    _, strategy = fit(synthetic, 2, privacy=target, ckpt_dir=tmp_path)
    client = strategy.clients["a"]
    would_reach = client.epsilon_after(3 * client.steps_per_round, 1e-5)
    assert would_reach > 2.0
    with pytest.raises(ValueError, match=rf"calibrated for 2 rounds; resuming to 5 rounds .*'a': {would_reach:.4f}"):
        fit(synthetic, 5, privacy=target, ckpt_dir=tmp_path, ckpt_path=tmp_path / "last.ckpt")


def test_a_checkpoint_made_with_other_privacy_settings_is_refused_naming_each_field(synthetic, tmp_path):
    fit(synthetic, 1, ckpt_dir=tmp_path)
    other = PrivacyConfig(noise_multiplier=0.5, max_grad_norm=2.0)
    with pytest.raises(ConfigError) as refused:
        fit(synthetic, 2, privacy=other, ckpt_dir=tmp_path, ckpt_path=tmp_path / "last.ckpt")
    assert str(refused.value) == (
        "checkpoint made with other settings; resume with them or start anew: "
        "privacy.noise_multiplier: checkpoint 1.0, now 0.5; privacy.max_grad_norm: checkpoint 1.0, now 2.0"
    )


def test_a_checkpoint_on_other_data_or_with_other_client_names_is_refused(synthetic, tmp_path):
    fit(synthetic, 1, ckpt_dir=tmp_path)
    x, y = synthetic.train.tensors
    other_data = FederatedDataModule(
        train=TensorDataset(x.flip(0), y.flip(0)), test=synthetic.test, clients=["a", "b", "c"], batch_size=32
    )
    other_data.setup()
    other_data.data_origin = "another source of the same size"
    with pytest.raises(ConfigError, match="trained on other data: data_origin: checkpoint 'user-provided data sets'"):
        fit(synthetic, 2, ckpt_dir=tmp_path, ckpt_path=tmp_path / "last.ckpt", datamodule=other_data)
    swapped = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=["b", "a", "c"], batch_size=32)
    with pytest.raises(
        ConfigError, match=r"clients \['a', 'b', 'c'\] differ from the data's clients \['b', 'a', 'c'\]"
    ):
        fit(synthetic, 2, ckpt_dir=tmp_path, ckpt_path=tmp_path / "last.ckpt", datamodule=swapped)


def damage(path: Path, how: str, tmp_path: Path) -> Path:
    """A copy of the checkpoint at ``path``, damaged as a disk, a cut-off copy or a wrong path would."""
    out = tmp_path / f"{how}.ckpt"
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = bytearray()
    elif how == "random":
        data = bytearray(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy())
    elif how == "tensor_bytes":  # 1,000 bytes flipped inside the largest stored tensor, the zip left intact
        with zipfile.ZipFile(path) as archive:
            largest = max(archive.infolist(), key=lambda info: info.file_size)
        start = largest.header_offset + 30 + len(largest.filename.encode()) + len(largest.extra) + 4096
        data[start : start + 1000] = bytes(255 - b for b in data[start : start + 1000])
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", "not a readable checkpoint, truncated or damaged"),
        ("empty", "the file is empty"),
        ("random", "not a readable checkpoint, truncated or damaged"),
        ("tensor_bytes", "checksum mismatch: the file was damaged after it was written"),
    ],
)
def test_a_damaged_checkpoint_is_refused_in_one_line_before_training(synthetic, tmp_path, how, message):
    fit(synthetic, 1, ckpt_dir=tmp_path)
    damaged = damage(tmp_path / "last.ckpt", how, tmp_path)
    with pytest.raises(ConfigError, match=message) as refused:
        fit(synthetic, 2, ckpt_path=damaged)
    assert "\n" not in str(refused.value) and str(damaged) in str(refused.value)


def test_a_checkpoint_of_another_model_or_without_federated_state_is_refused(synthetic, tmp_path):
    fit(synthetic, 1, ckpt_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"another model's weights \(missing \['net.0.bias'"):
        fit(synthetic, 2, ckpt_path=tmp_path / "last.ckpt", module=LitClassifier())  # the seed CNN
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    del checkpoint[CHECKPOINT_KEY]
    VerifiedCheckpointIO().save_checkpoint(checkpoint, tmp_path / "plain.ckpt")  # whole, but not federated
    with pytest.raises(ConfigError, match="not written by FederatedDPStrategy"):
        fit(synthetic, 2, ckpt_path=tmp_path / "plain.ckpt")
    plain = make_trainer("auto", 1, enable_checkpointing=False)  # a plain Lightning run's checkpoint
    plain.fit(small_classifier(), DataLoader(synthetic.train, batch_size=32), DataLoader(synthetic.test, batch_size=64))
    plain.save_checkpoint(tmp_path / "lightning.ckpt")
    with pytest.raises(ConfigError, match="carries no checksum"):
        fit(synthetic, 2, ckpt_path=tmp_path / "lightning.ckpt")


def test_a_checkpoint_write_that_dies_halfway_leaves_the_previous_checkpoint_intact(synthetic, tmp_path, monkeypatch):
    import fl_dp_lightning.checkpoint as checkpoint_module

    _, strategy = fit(synthetic, 1, ckpt_dir=tmp_path)
    path = tmp_path / "last.ckpt"
    before = path.read_bytes()
    real_save = torch.save

    def dies_halfway(obj, f):
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", dies_halfway)
    with pytest.raises(OSError, match="No space left"):
        strategy.lightning_module.trainer.save_checkpoint(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]  # no partial file left beside it


def test_a_checkpoint_is_written_after_every_round_including_those_no_client_joined(synthetic, tmp_path):
    pl.seed_everything(0)
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=["a", "b", "c"], batch_size=32)
    strategy = FederatedDPStrategy(privacy=SEEDED, client_fraction=0.5, client_sampling="poisson", seed=5)
    every_round = RoundCheckpoint(
        dirpath=tmp_path, filename="round{epoch}", save_top_k=-1, auto_insert_metric_name=False
    )
    trainer = make_trainer(strategy, 5, enable_checkpointing=True, callbacks=[every_round])
    trainer.fit(small_classifier(), datamodule)
    assert not strategy._full_plan(1).segments  # round 2 is empty
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == [f"round{e}.ckpt" for e in range(5)]
