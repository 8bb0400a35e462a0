"""The strategy on LightningModules that were not written for it."""

from __future__ import annotations

import inspect

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, resnet50

from fl_dp_lightning import FederatedDataModule, FederatedDPStrategy, PrivacyConfig
from fl_dp_lightning.config import ConfigError
from fl_dp_lightning.models import resnet18_groupnorm
from fl_dp_lightning.pytorch_lightning import FederatedDPStrategy as PLFederatedDPStrategy
from fl_dp_lightning.strategy.distributed import DistributedFederatedDPStrategy

from ..conftest import make_trainer
from .test_strategy import BatchNormModule, UnawareModule, split

pytestmark = [
    pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`"),
    pytest.mark.filterwarnings("ignore:privacy.fix_modules changed the model"),  # tested in test_real_use.py
]


class SchedulerModule(UnawareModule):
    """Its own optimizer with a StepLR scheduler that halves the learning rate every epoch."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}


def test_a_module_with_its_own_scheduler_keeps_it_one_step_per_round(synthetic):
    pl.seed_everything(0)
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=2, batch_size=32)
    module = SchedulerModule()
    trainer = make_trainer(FederatedDPStrategy(privacy=PrivacyConfig(noise_multiplier=0.8)), 3)
    trainer.fit(module, datamodule)
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.2 * 0.5**3
    assert trainer.validate(module, datamodule, verbose=False)[0]["my_acc"] > 0.5


def test_batchnorm_is_replaced_by_groupnorm_when_fix_modules_is_on(synthetic):
    pl.seed_everything(0)
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=2, batch_size=32)
    module = BatchNormModule()
    make_trainer(FederatedDPStrategy(privacy=PrivacyConfig(fix_modules=True)), 1).fit(module, datamodule)
    assert isinstance(module.body[1], nn.GroupNorm) and module.body[1].num_channels == 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in module.modules())


class ResNetModule(pl.LightningModule):
    """A torchvision ResNet-18 as a user would plug it in."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def tiny_clients(synthetic):
    small = split(synthetic.train, [32, 32])
    return FederatedDataModule(train={"a": small[0], "b": small[1]}, test=synthetic.test, batch_size=8)


def test_resnet18_groupnorm_is_torchvisions_resnet18_with_every_norm_a_groupnorm():
    net = resnet18_groupnorm(num_classes=10, in_channels=1)
    # every norm of ResNet-18: the stem, two per block (8 blocks), three in the downsample paths
    assert sum(isinstance(m, nn.GroupNorm) for m in net.modules()) == 1 + 2 * 8 + 3
    assert (
        sum(p.numel() for p in net.parameters())
        == sum(p.numel() for p in resnet18(num_classes=10).parameters()) - 3 * 64 * 49 + 64 * 9
    )
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


# a stock torchvision ResNet-18 under fix_modules: tests/test_examples.py (Lightning's CIFAR-10 baseline)


def test_a_frozen_resnet50_backbone_stays_frozen_and_keeps_its_normalisation_weights(synthetic):
    pl.seed_everything(0)
    net = resnet50(num_classes=10)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    for name, param in net.named_parameters():  # fine-tuning: only the head trains, as BaseFinetuning leaves it
        param.requires_grad_(name.startswith("fc."))
    with torch.no_grad():
        net.layer2[0].bn1.weight.uniform_(0.5, 1.5)
    pretrained = net.layer2[0].bn1.weight.detach().clone()
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    module = ResNetModule(net)
    backbone = net.layer4[2].conv3.weight.detach().clone()
    strategy = FederatedDPStrategy(privacy=PrivacyConfig(fix_modules=True))
    make_trainer(strategy, 1, limit_val_batches=0).fit(module, tiny_clients(synthetic))
    assert {n for n, p in net.named_parameters() if p.requires_grad} == trainable == {"fc.weight", "fc.bias"}
    assert isinstance(net.layer2[0].bn1, nn.GroupNorm) and torch.equal(net.layer2[0].bn1.weight, pretrained)
    assert torch.equal(net.layer4[2].conv3.weight, backbone)  # the frozen backbone did not move
    assert strategy.clients["a"].accountant.history == [(1.2, 0.25, 4)]


class InPlaceResidual(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(784, 784)
        self.head = nn.Linear(784, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x.flatten(1)
        out = self.inner(x)
        out += x  # in place, as torchvision's ResNet blocks add their residual
        return F.cross_entropy(self.head(out), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_an_in_place_residual_is_refused_at_the_probe_with_the_fix_and_spends_nothing(synthetic):
    module = InPlaceResidual()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    strategy = FederatedDPStrategy(privacy=PrivacyConfig(fix_modules=True))
    with pytest.raises(ValueError, match="out of place"):
        make_trainer(strategy, 1, limit_val_batches=0).fit(module, tiny_clients(synthetic))
    assert all(c.accountant.history == [] for c in strategy.clients.values())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_in_place_activations_are_refused_before_training_with_the_fix(synthetic):
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=2, batch_size=32)
    module = UnawareModule()
    module.body[2] = nn.ReLU(inplace=True)
    with pytest.raises(ValueError, match=r"body.2 \(in place\).*privacy.fix_modules=true"):
        make_trainer(FederatedDPStrategy(), 1).fit(module, datamodule)


@pytest.mark.parametrize(
    ("strategy", "typo", "meant"),
    [
        (FederatedDPStrategy, "privcy", "privacy"),
        (FederatedDPStrategy, "devise", "device"),
        (DistributedFederatedDPStrategy, "start_methd", "start_method"),
        (DistributedFederatedDPStrategy, "local_epoch", "local_epochs"),
    ],
)
def test_a_misspelt_setting_is_refused_in_one_line_naming_the_setting_meant(strategy, typo, meant):
    with pytest.raises(ConfigError, match=rf"unknown setting '{typo}': did you mean '{meant}'\?"):
        strategy(**{typo: 1})


def test_the_strategies_show_their_federated_settings_to_inspect_with_types_and_defaults():
    for strategy in (FederatedDPStrategy, DistributedFederatedDPStrategy, PLFederatedDPStrategy):
        params = inspect.signature(strategy).parameters
        assert params["privacy"].kind is inspect.Parameter.KEYWORD_ONLY
        assert params["local_epochs"].default == 1 and params["client_fraction"].default == 1.0
        assert "PrivacyConfig" in str(params["privacy"].annotation)


def test_lightning_settings_reach_lightning_and_the_device_is_the_one_given():
    strategy = FederatedDPStrategy(device="cpu", checkpoint_io=None)
    assert strategy.root_device == torch.device("cpu")
    assert type(strategy.checkpoint_io).__name__ == "VerifiedCheckpointIO"  # None keeps the verified default
    assert DistributedFederatedDPStrategy(start_method="spawn")._start_method == "spawn"
