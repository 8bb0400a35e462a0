"""The server's end of a round, written once for every engine and for several processes.

A round opens an aggregate (:func:`open_aggregate`: a running FedAvg, or a secure sum among the round's clients),
adds each client's :class:`~fl_dp_lightning.update.ClientUpdate` (:func:`add_update`: by its record count, or,
under user-level DP, its clipped update counting once) and ends in :func:`finish_round`: the average (or user-level
DP's noised mean of clipped updates, released even when nobody took part) and the server optimizer's step.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fl_dp_lightning.config import SecureAggregationConfig, ServerConfig
from fl_dp_lightning.server.aggregate import RunningAverage, averaged_keys
from fl_dp_lightning.server.optimizers import apply_server_optimizer
from fl_dp_lightning.server.secure_sum import SecureSum
from fl_dp_lightning.server.user_level import UserLevelDP
from fl_dp_lightning.update import ClientUpdate

Aggregate = RunningAverage | SecureSum
StateDict = Mapping[str, Tensor]


def open_aggregate(
    global_state: StateDict,
    only: Collection[str] | None,
    clients: Sequence[str],
    secure: SecureAggregationConfig,
    seed: int,
) -> Aggregate:
    """The round's empty aggregate over ``only`` (``None``: every float entry); a secure sum among ``clients``
    (its neighbour graph drawn from the public ``seed``) under ``secure_aggregation.enabled``."""
    if secure.enabled:
        return SecureSum(clients, global_state, only, secure, seed)
    return RunningAverage(only=only)


def add_update(
    aggregate: Aggregate, update: ClientUpdate, global_state: StateDict, user_level: UserLevelDP | None
) -> None:
    """Adds a trained client's update: its weights by its record count, or, under user-level DP, its clipped
    update (weights minus the global ones), which counts once whatever the client's size."""
    state = {**global_state, **update.params}
    if user_level is None:
        aggregate.add(state, weight=update.num_examples, client=update.client)
    else:
        delta = {k: state[k] - global_state[k] for k in aggregate.only}
        aggregate.add(user_level.clipped(delta), weight=1.0, client=update.client)


def finish_round(
    global_state: StateDict,
    aggregate: Aggregate,
    *,
    user_level: UserLevelDP | None,
    server: ServerConfig,
    server_state: dict[str, Any],
) -> tuple[dict[str, Tensor] | None, dict[str, Any]]:
    """The new global state and server-optimizer state; ``None`` (the model stays) when no client finished and
    no user-level DP release is due."""
    if user_level is not None:
        template = global_state
        summed = {
            k: aggregate.summed.get(k, torch.zeros_like(template[k], dtype=torch.float64)) for k in aggregate.only
        }
        mean = user_level.release(summed)  # noised even when nobody took part
        average = {**template, **{k: (template[k].double() + mean[k]).to(template[k].dtype) for k in mean}}
    elif aggregate.total_weight == 0:
        return None, server_state
    else:
        average = aggregate.result(global_state)
    keys = averaged_keys(global_state, aggregate.only)
    stepped, server_state = apply_server_optimizer(server, global_state, {k: average[k] for k in keys}, server_state)
    return {**average, **stepped}, server_state
