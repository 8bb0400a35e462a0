"""Data: sources, partitions and the federated data module."""

from fl_dp_lightning.data.datamodule import ClientDatasets, FederatedDataModule
from fl_dp_lightning.data.partition import dirichlet_partition, iid_partition
from fl_dp_lightning.data.sources import DataSource, load_fashion_mnist, load_mnist, load_synthetic

__all__ = [
    "ClientDatasets",
    "DataSource",
    "FederatedDataModule",
    "dirichlet_partition",
    "iid_partition",
    "load_fashion_mnist",
    "load_mnist",
    "load_synthetic",
]
