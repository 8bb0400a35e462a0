"""The vectorized client engine (``engine=vectorized``): many clients' DP-SGD steps at once with torch.func."""

from fl_dp_lightning.runtime.vectorized.checks import check_vectorizable
from fl_dp_lightning.runtime.vectorized.engine import VectorizedClients

__all__ = ["VectorizedClients", "check_vectorizable"]
