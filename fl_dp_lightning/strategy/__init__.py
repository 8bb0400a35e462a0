"""The federated DP strategy and its parts."""

from fl_dp_lightning.strategy.distributed import DistributedFederatedDPStrategy
from fl_dp_lightning.strategy.single_device import FederatedDPStrategy

__all__ = ["DistributedFederatedDPStrategy", "FederatedDPStrategy"]
