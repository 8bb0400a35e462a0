"""Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization"; Hsu et al. 2019 for FedAvgM).

Each round the server sees the clients' weighted average ``avg`` of the model; the pseudo-gradient is the average
client delta ``delta = avg - global``. A server optimizer turns it into the next global model:

- ``fedavg``: ``x + lr * delta`` (``lr = 1``: plain FedAvg, the average itself)
- ``fedavgm``: ``m = momentum * m + delta``, then ``x + lr * m``
- the adaptive ones: ``m = b1 * m + (1 - b1) * delta``, then ``x + lr * m / (sqrt(v) + tau)``, with
  ``v = v + delta^2`` (``fedadagrad``), ``v = b2 * v + (1 - b2) * delta^2`` (``fedadam``) or
  ``v = v - (1 - b2) * delta^2 * sign(v - delta^2)`` (``fedyogi``)

Moments start at zero (as Flower does). The state is a dict of tensors, so it goes into checkpoints as is.
Under DP the update is post-processing of the clients' noised releases: it costs no privacy.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fl_dp_lightning.config import SERVER_OPTIMIZERS, ServerConfig

State = dict[str, Tensor]


def server_step(
    name: str,
    global_state: Mapping[str, Tensor],
    average: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    *,
    lr: float = 1.0,
    momentum: float = 0.9,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> tuple[dict[str, Tensor], State]:
    """One server update of every key of ``average``; returns the new global entries and the new state.

    Args:
        name: one of :data:`SERVER_OPTIMIZERS`.
        global_state: the global model the round started from.
        average: the clients' weighted average (FedAvg) of the same keys.
        state: the optimizer's moments from the previous round (``{}`` at the start).
        lr: server learning rate. momentum: FedAvgM's. beta1, beta2, tau: the adaptive optimizers'.
    """
    if name not in SERVER_OPTIMIZERS:
        raise ValueError(f"server optimizer {name!r}: choose one of {SERVER_OPTIMIZERS}")
    new_params, new_state = {}, {}
    for key, avg in average.items():
        x = global_state[key].double()
        delta = avg.double() - x
        m = state[f"m.{key}"].to(delta) if f"m.{key}" in state else torch.zeros_like(delta)
        v = state[f"v.{key}"].to(delta) if f"v.{key}" in state else torch.zeros_like(delta)
        if name == "fedavg":
            step = delta
        elif name == "fedavgm":
            m = momentum * m + delta
            step = m
        else:
            m = beta1 * m + (1 - beta1) * delta
            square = delta * delta
            if name == "fedadagrad":
                v = v + square
            elif name == "fedadam":
                v = beta2 * v + (1 - beta2) * square
            else:  # fedyogi
                v = v - (1 - beta2) * square * torch.sign(v - square)
            step = m / (v.sqrt() + tau)
        new_params[key] = (x + lr * step).to(global_state[key].dtype)
        if name != "fedavg":
            new_state[f"m.{key}"] = m
        if name not in ("fedavg", "fedavgm"):
            new_state[f"v.{key}"] = v
    return new_params, new_state


def apply_server_optimizer(
    config: ServerConfig, global_state: Mapping[str, Tensor], average: Mapping[str, Tensor], state: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], State]:
    """:func:`server_step` with the settings of ``config``; plain FedAvg (``fedavg``, lr 1) returns ``average``."""
    if config.optimizer == "fedavg" and config.lr == 1.0:
        return dict(average), {}
    return server_step(
        config.optimizer,
        global_state,
        average,
        state,
        lr=config.lr,
        momentum=config.momentum,
        beta1=config.beta1,
        beta2=config.beta2,
        tau=config.tau,
    )
