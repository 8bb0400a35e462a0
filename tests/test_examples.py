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


# Four public Lightning projects, their modules in the published shape, only the strategy set (see each file's
# docstring for the source and commit, and for the data that replaces their downloads).


def test_lightning_tutorials_cifar10_baseline_trains_its_stock_torchvision_resnet18_under_fix_modules():
    from torchvision.models.resnet import BasicBlock

    trainer = load("cifar10_baseline").main(["--fast"])
    module, strategy = trainer.lightning_module, trainer.strategy
    assert set(strategy.epsilons()) == {"north", "south", "east"} and all(e > 0 for e in strategy.epsilons().values())
    assert all(c.accountant.history == [(1.2, 0.5, 2)] for c in strategy.clients.values())  # 8 records, batch 4
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())  # GroupNorm in their place
    assert sum(isinstance(m, BasicBlock) for m in module.modules()) == 8  # the blocks, now adding out of place
    assert torch.isfinite(trainer.callback_metrics["test_acc"])


def test_lightning_tutorials_datamodules_litmodel_without_batch_idx_learns_mnist():
    assert load("datamodules_tutorial").main(["--fast"]) > 0.15  # chance is 0.1; 2 DP rounds at Adam's 2e-4


def test_lightnings_lstm_demo_is_refused_for_its_carried_hidden_state_and_trains_once_it_starts_anew():
    refused, epsilons = load("lightning_lstm").main(["--fast"])
    assert "keeps state across calls in ['hidden[0]', 'hidden[1]']" in refused and "self.hidden = None" in refused
    assert "\n" not in refused
    assert set(epsilons) == {"ana", "ben", "cai"} and all(e > 0 for e in epsilons.values())


def test_lightnings_fine_tuning_example_under_lightning_cli_keeps_its_resnet50_backbone_frozen(monkeypatch):
    import lightning.pytorch as pl

    monkeypatch.setenv("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    example = load("vision_fine_tuning")
    pl.seed_everything(1234)  # the CLI's seed: the same initial weights
    initial = example.TransferLearningModel()
    cli = example.main(
        [
            "fit",
            "--trainer.strategy=fl_dp_lightning.FederatedDPStrategy",
            "--trainer.strategy.privacy.fix_modules=true",
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
            "--data.train_images=32",
            "--data.image_size=32",
            "--data.batch_size=4",
        ]
    )
    module = cli.model
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable == [n for n, _ in initial.fc.named_parameters(prefix="fc")]  # the head only, as before DP
    after, before = module.feature_extractor, initial.feature_extractor
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in after.modules())
    assert all(torch.equal(after.get_parameter(n), p) for n, p in before.named_parameters())  # did not move
    assert not torch.equal(module.fc[0].weight, initial.fc[0].weight)  # the head trained
    assert set(cli.trainer.strategy.epsilons()) == {"client_0", "client_1"}
