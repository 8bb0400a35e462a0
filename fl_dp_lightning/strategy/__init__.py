"""The federated DP strategy and its parts."""

from fl_dp_lightning.strategy.client import ClientReport, ClientState
from fl_dp_lightning.strategy.distributed import DistributedFederatedDPStrategy
from fl_dp_lightning.strategy.federated_dp import FederatedDPStrategy

__all__ = ["ClientReport", "ClientState", "DistributedFederatedDPStrategy", "FederatedDPStrategy"]
