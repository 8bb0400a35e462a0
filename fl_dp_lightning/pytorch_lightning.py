"""The strategy for projects written against the standalone ``pytorch_lightning`` package.

``lightning.pytorch`` and ``pytorch_lightning`` ship the same Trainer under two names whose classes do not mix:
a ``pytorch_lightning.Trainer`` takes only ``pytorch_lightning`` strategies and modules. This is the same
:class:`~fl_dp_lightning.FederatedDPStrategy`, built on ``pytorch_lightning``'s single-device strategy::

    import pytorch_lightning as pl
    from fl_dp_lightning.pytorch_lightning import FederatedDPStrategy

    trainer = pl.Trainer(strategy=FederatedDPStrategy(), max_epochs=5)
    trainer.fit(model, train_dataloaders=ClientDatasets({...}, batch_size=64), val_dataloaders=val_loader)

(``FederatedDataModule`` is a ``lightning.pytorch`` data module: with ``pytorch_lightning``, return its
``train_dataloader()`` from your own data module, or pass ``ClientDatasets`` as above.)
"""

from __future__ import annotations

from pytorch_lightning.strategies import SingleDeviceStrategy, StrategyRegistry

from fl_dp_lightning.strategy.single_device import FederatedDPStrategy as _Strategy
from fl_dp_lightning.strategy.single_device import SingleDeviceRounds


class FederatedDPStrategy(SingleDeviceRounds, SingleDeviceStrategy):
    __doc__ = _Strategy.__doc__
    strategy_name = _Strategy.strategy_name


if FederatedDPStrategy.strategy_name not in StrategyRegistry:  # pytorch_lightning.Trainer(strategy="federated_dp")
    StrategyRegistry.register(
        FederatedDPStrategy.strategy_name, FederatedDPStrategy, description=__doc__.splitlines()[0]
    )
