"""The seed workload's client as a Flower ``ClientApp``: the reference that ``benchmarks/frameworks.py`` times.

It lives in its own module, as Flower's own apps do, so that the simulation's worker processes import it by name.
Each client trains one local epoch with the seed tutorial's loop (SGD + Opacus's PrivacyEngine, Poisson batches) on
its half of the seed split, which the server names in the round's config (``data``).
"""

from __future__ import annotations

from common import opacus_local_epoch  # benchmarks/ is on sys.path (PYTHONPATH in the simulation's workers)
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from frameworks import BATCH, CLIP, LR, NOISE, load_clients

from fl_dp_lightning.models import seed_cnn

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local DP epoch from the global weights in ``msg``; the weights and the record count go back."""
    datamodule = load_clients(str(msg.content["config"]["data"]))
    dataset = list(datamodule.client_datasets.values())[int(context.node_config["partition-id"])]
    model = seed_cnn()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    state, _, _ = opacus_local_epoch(model, dataset, lr=LR, batch=BATCH, noise=NOISE, clip=CLIP)
    metrics = MetricRecord({"num-examples": len(dataset)})
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)
