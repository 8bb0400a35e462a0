"""The cross-device client as a Flower ``ClientApp``: the reference that ``benchmarks/cross_device.py`` times.

Each client holds ``RECORDS_PER_CLIENT`` synthetic 1x28x28 records drawn from its partition id and trains one local
epoch of the seed CNN with SGD (lr 0.1, one batch of all its records), as a client of ours does under
``privacy=none`` with user-level DP-FedAvg (whose clipping and noise Flower's server-side DP wrapper applies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_dp_lightning.models import seed_cnn

RECORDS_PER_CLIENT = 10
LR = 0.1

app = ClientApp()


def client_records(partition: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The client's records: learnable synthetic digits (a template per class plus noise) from its own seed."""
    templates = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1 + partition)
    y = torch.randint(0, 10, (RECORDS_PER_CLIENT,), generator=gen)
    return templates[y] + 1.5 * torch.randn(RECORDS_PER_CLIENT, 1, 28, 28, generator=gen), y


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local epoch (one batch) from the global weights in ``msg``; the weights and the record count go back."""
    x, y = client_records(int(context.node_config["partition-id"]))
    model = seed_cnn()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    metrics = MetricRecord({"num-examples": RECORDS_PER_CLIENT})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)
