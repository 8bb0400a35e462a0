"""What runs inside a client's datasite: one client's round, from the terms its owner approved.

The code an owner approves (see :mod:`fl_dp_lightning.runtime.syft.clients`) calls :func:`run_round` with the
private records, the server's request for this round (global weights, SGD settings) and the terms written into the
approved code: the model to rebuild, the client's sampling and privacy settings, the rounds the approval covers.
Everything that makes the guarantee (noise, clip norm, sample rate, steps per round, the accountant, the random
streams) comes from those terms or lives here; the server's request cannot change it. The round itself is the
vectorized engine's client round (:class:`~fl_dp_lightning.runtime.vectorized.engine.VectorizedClients`), the same code
as the local runtime's ``engine=vectorized``. Only the new weights, the record count and the privacy spent go back.

This module imports no syft: a datasite runs it in its own Python, which needs fl_dp_lightning installed.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fl_dp_lightning.config import ClientOverride, EngineConfig, PrivacyConfig
from fl_dp_lightning.runtime.client import ClientState, make_client
from fl_dp_lightning.runtime.vectorized.engine import VectorizedClients
from fl_dp_lightning.update import RoundRequest

_SITES: dict[tuple[str, str], DatasiteClient] = {}
"""Each run's client state in this datasite's process, by (session, client): it outlives a round, never leaves."""


APPROVAL_USED = "approval used"
"""A reply's ``refused`` value when the approved code has run the rounds its owner approved: ask again."""


def build_module(spec: dict[str, Any]) -> nn.Module:
    """The module from its class (``"package.module:Qualified.Name"``) and saved hyperparameters."""
    path, _, name = spec["class"].partition(":")
    cls: Any = importlib.import_module(path)
    for part in name.split("."):
        cls = getattr(cls, part)
    return cls(**spec["hparams"])


class DatasiteClient:
    """One client's lasting state inside its datasite: its records, model, optimizer, accountant and streams."""

    def __init__(self, records: dict[str, Any], terms: dict[str, Any]):
        x, y = (torch.as_tensor(np.asarray(records[key])) for key in ("x", "y"))
        self.dataset = TensorDataset(x, y)
        self.privacy = PrivacyConfig(**terms["privacy"])
        self.module = build_module(terms["model"])
        named = dict(self.module.named_parameters())
        self.optimizer = torch.optim.SGD([{"params": [named[n] for n in group]} for group in terms["groups"]], lr=0.0)
        self.client: ClientState = make_client(
            terms["client"],
            terms["index"],
            self.dataset,
            privacy=self.privacy,
            batch_size=terms["batch_size"],
            local_epochs=terms["local_epochs"],
            override=ClientOverride(**terms["override"]),
            seed=terms["seed"],
            device=torch.device("cpu"),
        )
        self.client.noise_multiplier = terms["noise_multiplier"]  # as calibrated before the request was made
        if self.client.accountant is not None:  # a resumed run: what the client spent before stays spent
            self.client.accountant.history = [tuple(entry) for entry in terms["history"]]
        self.client.steps_taken = terms["steps_taken"]
        self.engine = VectorizedClients(
            self.module,
            self.optimizer,
            {self.client.name: self.dataset},
            [self.client],
            engine=EngineConfig(**terms["engine"]),
            privacy=self.privacy,
            device=torch.device("cpu"),
        )
        self.rounds_run: dict[int, int] = {}

    def round(self, request: dict[str, Any], terms: dict[str, Any]) -> dict[str, Any]:
        """Trains one round from the request's global weights; the reply that leaves the datasite (or, refused,
        why: the approval's rounds are used up, or the round would pass the approved epsilon)."""
        approval, limit = terms["approval"], terms["approved_rounds"]
        if limit is not None and self.rounds_run.get(approval, 0) >= limit:
            return {"refused": APPROVAL_USED, "reason": f"approval {approval} covered {limit} round(s)"}
        budget, client = terms["max_epsilon"], self.client
        if budget is not None and client.epsilon_after(client.steps_per_round, self.privacy.delta) > budget:
            return {"refused": "budget", "reason": f"another round would carry epsilon past the approved {budget}"}
        self.module.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in request["weights"].items()})
        for group, settings in zip(self.optimizer.param_groups, request["sgd"]):
            group.update(settings)  # lr, momentum, ...: the server's schedule; none of them affects privacy
        asked = RoundRequest(int(request["round"]), float(request["proximal_mu"]), bool(terms["release_metrics"]))
        # the round counts against the approval from here, where training (and spending privacy) starts: a request
        # that fails before it (weights that do not fit, bad settings) uses nothing up
        self.rounds_run[approval] = self.rounds_run.get(approval, 0) + 1
        update = next(self.engine.train(asked, [client]))
        return {
            "params": {name: value.detach().cpu().numpy() for name, value in update.params.items()},
            "num_examples": client.num_examples,
            "epsilon": client.epsilon(self.privacy.delta),
            "history": [] if client.accountant is None else [list(entry) for entry in client.accountant.history],
            "steps_taken": client.steps_taken,
            "metrics": update.metrics,
        }


def run_round(records: dict[str, Any], request: dict[str, Any], terms: dict[str, Any]) -> dict[str, Any]:
    """The approved code's body: this run's client in this datasite (built on its first round) trains a round.

    PySyft runs approved code twice, on the private asset and on its mock; the mock (marked ``"mock": True`` by
    :class:`~fl_dp_lightning.runtime.syft.clients.Datasite`) trains nothing, so it spends no privacy and leaves the
    client's streams and accountant as they are.
    """
    if records.get("mock"):
        return {"refused": "mock", "reason": "the mock trains nothing"}
    key = (terms["session"], terms["client"])
    if key not in _SITES:
        _SITES[key] = DatasiteClient(records, terms)
    return _SITES[key].round(request, terms)
