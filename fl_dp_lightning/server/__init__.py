"""The server side: what happens to the clients' released updates (pure functions over tensors)."""

from fl_dp_lightning.server.optimizers import apply_server_optimizer, server_step

__all__ = ["apply_server_optimizer", "server_step"]
