"""Lightning's computer-vision fine-tuning example under LightningCLI (a ResNet-50 feature extractor frozen by a
`BaseFinetuning` callback, a small head trained), federated and private by the Trainer's strategy setting.

The module, callback and CLI have the example's shape (Lightning-AI/pytorch-lightning,
examples/pytorch/domain_templates/computer_vision_fine_tuning.py at commit
017bff996a9a7e058939fb7232db619d8f3a73a0, Apache-2.0; written anew here): `TransferLearningModel` with
torchvision's ResNet-50 as `feature_extractor` and a three-layer head, binary cross-entropy on logits, Adam with
a MultiStepLR, `MilestonesFinetuning` unfreezing the backbone at two milestones, and a LightningCLI that links
`data.batch_size`, `finetuning.milestones` and `finetuning.train_bn` into the model. The example downloads the
cats-and-dogs images and ImageNet weights; here both are offline: two-class synthetic images in the data
module's place and `weights=None` (pass `--model.weights=DEFAULT` where the weights can be downloaded).

The strategy is a command-line setting, as any LightningCLI project sets it:

    python examples/vision_fine_tuning.py fit --trainer.strategy=fl_dp_lightning.FederatedDPStrategy \\
        --trainer.strategy.privacy.fix_modules=true --trainer.max_epochs=3

`fix_modules` replaces the frozen BatchNorms by GroupNorms that stay frozen and keep the pretrained affine
weights; only the head trains (and, from the milestones on, the layers the callback unfreezes).
(LightningCLI needs jsonargparse: pip install "jsonargparse[signatures]".)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks.finetuning import BaseFinetuning
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import get_torchvision_model
from torch import nn, optim
from torch.optim.lr_scheduler import MultiStepLR
from torch.utils.data import TensorDataset
from torchmetrics import Accuracy

from fl_dp_lightning import FederatedDataModule


class MilestonesFinetuning(BaseFinetuning):
    def __init__(self, milestones: tuple = (5, 10), train_bn: bool = False):
        super().__init__()
        self.milestones = milestones
        self.train_bn = train_bn

    def freeze_before_training(self, pl_module: LightningModule):
        self.freeze(modules=pl_module.feature_extractor, train_bn=self.train_bn)

    def finetune_function(self, pl_module: LightningModule, epoch: int, optimizer):
        if epoch == self.milestones[0]:  # the last five layer groups
            self.unfreeze_and_add_param_group(
                modules=pl_module.feature_extractor[-5:], optimizer=optimizer, train_bn=self.train_bn
            )
        elif epoch == self.milestones[1]:  # the rest
            self.unfreeze_and_add_param_group(
                modules=pl_module.feature_extractor[:-5], optimizer=optimizer, train_bn=self.train_bn
            )


def cats_and_dogs(n: int, side: int, seed: int) -> TensorDataset:
    """``n`` two-class 3 x side x side images (a brighter or darker template plus noise)."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 2, (n,), generator=gen)
    return TensorDataset(templates[y] + 0.5 * torch.randn(n, 3, side, side, generator=gen), y)


class CatDogImageDataModule(FederatedDataModule):
    """The example's data module in federated form: its ``batch_size`` (linked into the model), the images
    split among ``clients`` veterinary practices."""

    def __init__(self, batch_size: int = 8, clients: int = 2, train_images: int = 2000, image_size: int = 224):
        super().__init__(
            train=cats_and_dogs(train_images, image_size, 1),
            test=cats_and_dogs(max(200, train_images // 10), image_size, 2),
            clients=clients,
            batch_size=batch_size,
            num_classes=2,
        )


class TransferLearningModel(LightningModule):
    def __init__(
        self,
        backbone: str = "resnet50",
        weights: str | None = None,
        train_bn: bool = False,
        milestones: tuple = (2, 4),
        batch_size: int = 32,
        lr: float = 1e-3,
        lr_scheduler_gamma: float = 1e-1,
    ) -> None:
        """Args: backbone: a ``torchvision.models`` name; weights: its weights (``"DEFAULT"``: ImageNet,
        downloaded); train_bn: whether BatchNorm layers train; milestones: the two unfreezing epochs; lr: the
        initial learning rate; lr_scheduler_gamma: its factor at each milestone."""
        super().__init__()
        self.backbone, self.weights, self.train_bn = backbone, weights, train_bn
        self.milestones, self.batch_size = milestones, batch_size
        self.lr, self.lr_scheduler_gamma = lr, lr_scheduler_gamma
        self.__build_model()
        self.train_acc = Accuracy(task="binary")
        self.valid_acc = Accuracy(task="binary")
        self.save_hyperparameters()

    def __build_model(self):
        backbone = get_torchvision_model(self.backbone, weights=self.weights)
        self.feature_extractor = nn.Sequential(*list(backbone.children())[:-1])
        self.fc = nn.Sequential(nn.Linear(2048, 256), nn.ReLU(), nn.Linear(256, 32), nn.Linear(32, 1))
        self.loss_func = F.binary_cross_entropy_with_logits

    def forward(self, x):
        x = self.feature_extractor(x).squeeze(-1).squeeze(-1)
        return self.fc(x)

    def loss(self, logits, labels):
        return self.loss_func(input=logits, target=labels)

    def training_step(self, batch, batch_idx):
        x, y = batch
        y_logits = self.forward(x)
        y_true = y.view((-1, 1)).type_as(x)
        self.log("train_acc", self.train_acc(torch.sigmoid(y_logits), y_true.int()), prog_bar=True)
        return self.loss(y_logits, y_true)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        y_logits = self.forward(x)
        y_true = y.view((-1, 1)).type_as(x)
        self.log("val_loss", self.loss(y_logits, y_true), prog_bar=True)
        self.log("val_acc", self.valid_acc(torch.sigmoid(y_logits), y_true.int()), prog_bar=True)

    def configure_optimizers(self):
        parameters = list(self.parameters())
        trainable = [p for p in parameters if p.requires_grad]
        rank_zero_info(
            f"The model will start training with only {len(trainable)} trainable parameters out of {len(parameters)}."
        )
        optimizer = optim.Adam(trainable, lr=self.lr)
        return [optimizer], [MultiStepLR(optimizer, milestones=self.milestones, gamma=self.lr_scheduler_gamma)]


class MyLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.add_lightning_class_args(MilestonesFinetuning, "finetuning")
        parser.link_arguments("data.batch_size", "model.batch_size")
        parser.link_arguments("finetuning.milestones", "model.milestones")
        parser.link_arguments("finetuning.train_bn", "model.train_bn")
        parser.set_defaults(
            {"trainer.max_epochs": 15, "trainer.enable_model_summary": False, "trainer.num_sanity_val_steps": 0}
        )


def main(args: list[str] | None = None) -> LightningCLI:
    return MyLightningCLI(
        TransferLearningModel, CatDogImageDataModule, args=args, seed_everything_default=1234,
        save_config_kwargs={"overwrite": True},
    )  # fmt: skip


if __name__ == "__main__":
    main()
