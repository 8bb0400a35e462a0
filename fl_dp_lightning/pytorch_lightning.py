"""The strategy and data module for projects written against the standalone ``pytorch_lightning`` package.

``lightning.pytorch`` and ``pytorch_lightning`` ship the same Trainer under two names whose classes do not mix:
a ``pytorch_lightning.Trainer`` takes only ``pytorch_lightning`` strategies and modules. This is the same
:class:`~fl_dp_lightning.FederatedDPStrategy`, built on ``pytorch_lightning``'s single-device strategy::

    import pytorch_lightning as pl
    from fl_dp_lightning.pytorch_lightning import FederatedDPStrategy

    from fl_dp_lightning.pytorch_lightning import FederatedDataModule, FederatedDPStrategy

    trainer = pl.Trainer(strategy=FederatedDPStrategy(), max_epochs=5)
    trainer.fit(model, FederatedDataModule(clients=["alice", "bob"], batch_size=64))
"""

from __future__ import annotations

from pytorch_lightning import LightningDataModule
from pytorch_lightning.strategies import SingleDeviceStrategy, StrategyRegistry

from fl_dp_lightning.data.datamodule import FederatedDataModule as _DataModule
from fl_dp_lightning.strategy.single_device import FederatedDPStrategy as _Strategy
from fl_dp_lightning.strategy.single_device import SingleDeviceRounds


class FederatedDPStrategy(SingleDeviceRounds, SingleDeviceStrategy):
    __doc__ = _Strategy.__doc__
    strategy_name = _Strategy.strategy_name


class FederatedDataModule(_DataModule, LightningDataModule):
    __doc__ = _DataModule.__doc__


if FederatedDPStrategy.strategy_name not in StrategyRegistry:  # pytorch_lightning.Trainer(strategy="federated_dp")
    StrategyRegistry.register(
        FederatedDPStrategy.strategy_name, FederatedDPStrategy, description=__doc__.splitlines()[0]
    )
