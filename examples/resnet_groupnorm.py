"""A torchvision ResNet-18 under federated DP-SGD.

Stock ResNet-18 has BatchNorm (mixes examples in a batch, so per-example privacy breaks) and adds its residual in
place (Opacus's hooks cannot follow that). `resnet18_groupnorm` is torchvision's ResNet with GroupNorm and an
out-of-place residual; `PrivacyConfig(fix_modules=True)` would fix BatchNorm and in-place activations of other
models in place.

    python examples/resnet_groupnorm.py [--fast]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl

from fl_dp_lightning import FederatedDataModule, FederatedDPStrategy, LitClassifier, PrivacyConfig
from fl_dp_lightning.data.sources import load_synthetic
from fl_dp_lightning.models import resnet18_groupnorm


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a few examples, 1 round")
    args = parser.parse_args(argv)
    size, batch_size = (24, 4) if args.fast else (2000, 16)  # fast: small batches, a CPU test's time
    source = load_synthetic(size, 64)
    data = FederatedDataModule(train=source.train, test=source.test, clients=["alice", "bob"], batch_size=batch_size)

    pl.seed_everything(0)
    model = LitClassifier(resnet18_groupnorm(num_classes=10, in_channels=1), lr=0.05)
    trainer = pl.Trainer(
        max_epochs=1 if args.fast else 3,
        strategy=FederatedDPStrategy(privacy=PrivacyConfig(noise_multiplier=1.0)),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.fast,
        limit_val_batches=0 if args.fast else 1.0,
    )
    trainer.fit(model, data)
    epsilons = trainer.strategy.epsilons()
    print(f"epsilon per client {epsilons}")
    return epsilons


if __name__ == "__main__":
    main()
