"""The examples/ projects run as shipped (fast settings)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def in_a_scratch_folder(tmp_path, monkeypatch):
    """The examples write reports and logs into the current folder, as a user's script would."""
    monkeypatch.chdir(tmp_path)


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # importable by name, as when run as a script: its classes pickle into checkpoints
    spec.loader.exec_module(module)
    return module


def test_existing_project_learns_under_the_strategy():
    assert load("existing_project").main(["--fast"]) > 0.5  # chance is 0.1


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`")
def test_resnet_example_trains_a_private_round():
    epsilons = load("resnet_groupnorm").main(["--fast"])
    assert set(epsilons) == {"alice", "bob"} and all(e > 0 for e in epsilons.values())


@pytest.mark.filterwarnings("ignore:privacy.fix_modules changed the model")
@pytest.mark.filterwarnings("ignore:Attribute 'net' is an instance of `nn.Module`")  # the template's own choice
def test_hydra_template_style_project_with_batchnorm_trains_after_fix_modules():
    assert load("hydra_template_mnist").main(["--fast"]) > 0.4  # chance is 0.1


def test_pytorch_lightning_transformer_learns_to_reverse_sequences():
    assert load("pytorch_lightning_transformer").main(["--fast"]) > 0.5  # chance is 0.1


def test_lightning_cli_autoencoder_fits_and_predicts(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning_cli_autoencoder.py"])
    monkeypatch.setenv("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    common = [
        "--data.source=synthetic",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = load("lightning_cli_autoencoder").main(["fit", "--trainer.max_epochs=1", "--data.clients=4", *common])
    assert set(cli.trainer.strategy.epsilons()) == {f"client_{i}" for i in range(4)}
    assert torch.isfinite(cli.trainer.callback_metrics["val_loss"])
    reconstructions = cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    test_records = len(cli.datamodule.test_set)
    assert torch.cat(reconstructions).shape == (test_records, 28 * 28) and test_records == 450  # 500 less validation
