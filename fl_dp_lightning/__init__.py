"""fl_dp_lightning: federated learning with per-client DP-SGD as a PyTorch Lightning strategy."""

__version__ = "0.2.0.dev0"

from lightning.pytorch.strategies import StrategyRegistry  # noqa: E402

from fl_dp_lightning.callbacks import FederatedLogger, FederatedProgressBar
from fl_dp_lightning.config import ClientConfig, ConfigError, DataConfig, PrivacyConfig, ServerConfig
from fl_dp_lightning.data import ClientDatasets, FederatedDataModule
from fl_dp_lightning.models import LitClassifier, seed_cnn
from fl_dp_lightning.privacy import epsilon_spent, make_accountant
from fl_dp_lightning.strategy import DistributedFederatedDPStrategy, FederatedDPStrategy

for _strategy in (FederatedDPStrategy, DistributedFederatedDPStrategy):  # Trainer(strategy="federated_dp"), ...
    if _strategy.strategy_name not in StrategyRegistry:
        StrategyRegistry.register(_strategy.strategy_name, _strategy, description=_strategy.__doc__.splitlines()[0])

__all__ = [
    "__version__",
    "ClientConfig",
    "ClientDatasets",
    "ConfigError",
    "DataConfig",
    "DistributedFederatedDPStrategy",
    "FederatedDPStrategy",
    "FederatedDataModule",
    "FederatedLogger",
    "FederatedProgressBar",
    "LitClassifier",
    "PrivacyConfig",
    "ServerConfig",
    "epsilon_spent",
    "make_accountant",
    "seed_cnn",
]
