"""Clients as PySyft datasites, seen from the server (the data scientist): ``client.runtime=syft``.

Each client becomes a PySyft 0.9.5 datasite that holds its records as a private asset, with a mock of random
data of the same shape beside it. The server logs in as a data scientist and asks each owner to approve one
function: code that calls :func:`fl_dp_lightning.runtime.syft.datasite.run_round` with the terms written into it
(model, sampling, noise, clip norm, accountant, the rounds the approval covers, the epsilon it may reach). Once it
is approved, every round sends the global weights and SGD settings as a request object, runs the approved code on
the private asset and reads back the reply: new weights, record count, epsilon and the accountant's history (the
server mirrors the history to check budgets and write the report; the random streams stay in the datasite).

Datasites run in this process by default, a single-process simulation with no isolation (the server's process
can read every record), or each as its own HTTP server process on a loopback port (``client.syft.port``): then
the records live only in their datasite's process (the server hands them over at the start and keeps their count),
and so do the client's accountant and the approved-round count, out of the server process's reach. Each owner's
login is a secret generated for its datasite (PySyft's default root login is replaced before any upload and is
never written anywhere); the server logs in as a data scientist, who cannot read the private asset. A request the
owner denies, a datasite that errs and one that does not answer within ``client.syft.timeout_s`` drop that client
from the round, as ``client.on_failure`` says.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import multiprocessing
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from pprint import pformat
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import TensorDataset

from fl_dp_lightning.config import ClientOverride, ConfigError, EngineConfig, PrivacyConfig, SyftConfig
from fl_dp_lightning.runtime.client import ClientState
from fl_dp_lightning.runtime.syft.datasite import APPROVAL_USED, build_module
from fl_dp_lightning.runtime.vectorized.engine import SGD_SETTINGS
from fl_dp_lightning.update import ClientUpdate, RoundRequest

PYSYFT_DEFAULT_LOGIN = ("info@openmined.org", "changethis")
"""PySyft's root login of a new datasite: replaced by the owner's own secrets before anything is uploaded."""
SCIENTIST_EMAIL = "server@example.org"
BLOB_STORE_THRESHOLD_MB = 1 << 20
# PySyft parses submitted code with ast.parse, which CPython before 3.11.8 and 3.12.2 cannot run in two threads at
# once (gh-106905: "AST constructor recursion depth mismatch"); datasites are asked in parallel threads.
_SUBMISSION = threading.Lock()
"""Objects PySyft keeps out of its blob store (MB): all of them (set only when the environment does not say)."""
APPROVED_CODE = '''def {name}(records, request):
    """fl_dp_lightning: one DP-SGD round of client {client!r} on these records, under the terms below."""
    from fl_dp_lightning.runtime.syft.datasite import run_round

    return run_round(records, request, terms={terms})
'''
"""The code an owner approves: everything that decides the privacy guarantee is a literal in it."""


class ClientFailure(RuntimeError):
    """A client's round did not come back (denied, failed or timed out): it is dropped from the round."""


def import_syft() -> Any:
    """PySyft, or a one-line refusal naming the extra and the make target."""
    try:
        import syft
    except ImportError as err:
        raise ConfigError(
            "client.runtime=syft needs PySyft 0.9.5, which pins its own numpy: run it in its own environment "
            "(make syft-test builds .venv-syft; or pip install -e '.[syft]' in a fresh venv)"
        ) from err
    return syft


def module_spec(module: nn.Module) -> dict[str, Any]:
    """How a datasite rebuilds ``module``: its class and saved hyperparameters, checked by rebuilding it here."""
    cls = type(module)
    spec = {"class": f"{cls.__module__}:{cls.__qualname__}", "hparams": dict(getattr(module, "hparams", {}))}
    try:
        rebuilt = build_module(spec)
        same = {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in module.state_dict().items()
        }
    except Exception:  # any failure to rebuild is the refusal below
        same = False
    if not same:
        raise ConfigError(
            f"client.runtime=syft rebuilds the model inside each datasite from its class ({spec['class']}) and "
            "saved hyperparameters, which do not give the same parameters here: call self.save_hyperparameters() "
            "in __init__ and build every layer from those arguments (a network passed in as an object cannot travel)"
        )
    return spec


class Datasite:
    """One client's datasite: the owner's side (upload, approval) and the data scientist's (requests, rounds)."""

    def __init__(self, name: str, dataset: TensorDataset, port: int | None):
        self.sy = sy = import_syft()
        self.name = name
        # PySyft moves objects over 1 MB to its blob store, then walks their bytes one by one on every read: a
        # client's records took 20 s per round that way (30,000 images), 3 s in the action store (measured)
        os.environ.setdefault("MIN_SIZE_BLOB_STORAGE_MB", str(BLOB_STORE_THRESHOLD_MB))
        if port is None:
            self.server = sy.orchestra.launch(name=f"fl-{name}", reset=True)
        else:
            with spawned_processes():  # a forked datasite would inherit this process's memory: every client's records
                self.server = sy.orchestra.launch(
                    name=f"fl-{name}", reset=True, port=port, dev_mode=False, host="127.0.0.1"
                )
        self.owner = self._own()
        x, y = (t.numpy() for t in dataset.tensors)
        mock_rng = np.random.default_rng(0)  # public random data of the same shapes and label range
        mock = {
            "x": mock_rng.standard_normal(x.shape).astype(x.dtype),
            "y": mock_rng.integers(int(y.min()), int(y.max()) + 1, y.shape).astype(y.dtype),
            "mock": True,  # PySyft also runs approved code on the mock: this run must not train (see run_round)
        }
        asset = sy.Asset(name="records", data={"x": x, "y": y}, mock=mock)
        self.owner.upload_dataset(sy.Dataset(name=f"{name} records", asset_list=[asset]))
        password = secrets.token_urlsafe(16)
        self.owner.register(
            name="fl_dp_lightning server", email=SCIENTIST_EMAIL, password=password, password_verify=password
        )
        self.scientist = self.server.login(email=SCIENTIST_EMAIL, password=password)
        self.asset = self.scientist.datasets[0].assets[0]
        self.function: str | None = None
        self.approvals = 0
        """Requests its owner approved so far."""

    def _own(self) -> Any:
        """Replaces PySyft's default root login by a generated one and logs the owner in with it. The secret stays
        in this call: nothing holds or writes it afterwards (the owner's session is a signed key, not a password)."""
        email, password = f"owner-{secrets.token_hex(8)}@example.org", secrets.token_urlsafe(24)
        root = self.server.login(email=PYSYFT_DEFAULT_LOGIN[0], password=PYSYFT_DEFAULT_LOGIN[1])
        root.account.set_password(password, confirm=False)
        root.account.set_email(email)
        return self.server.login(email=email, password=password)

    def request(self, name: str, source: str, approval: str, timeout: float) -> None:
        """Submits the approved code ``source`` (function ``name``) and waits for the owner's answer."""
        sy = self.sy
        from syft.service.policy.policy import OutputPolicyExecuteCount

        function = load_function(name, source)
        policy = sy.MixedInputPolicy(records=self.asset, request=dict, client=self.scientist)
        # syft 0.9.5 does not enforce its execution count: the approved code counts its own rounds
        with _SUBMISSION:
            submitted = sy.syft_function(input_policy=policy, output_policy=OutputPolicyExecuteCount(limit=10**9))(
                function
            )
            request = self.scientist.code.request_code_execution(submitted)
        if approval == "auto":
            self.owner.requests.get_by_uid(request.id).approve()
        deadline = time.monotonic() + timeout
        while True:
            status = str(self.owner.requests.get_by_uid(request.id).status)
            if status.endswith("APPROVED"):
                self.function, self.approvals = name, self.approvals + 1
                return
            if status.endswith("REJECTED"):
                raise ClientFailure(f"the owner of datasite {self.name!r} denied the training request")
            if time.monotonic() > deadline:
                raise ClientFailure(f"the owner of datasite {self.name!r} did not answer within {timeout:g} s")
            time.sleep(0.2)

    def run(self, request: dict[str, Any], quote_errors: bool) -> dict[str, Any]:
        """Runs the approved code on the private asset with ``request``; the datasite's reply. An error's message
        is quoted only when ``quote_errors`` (it may quote private records)."""
        sy = self.sy
        argument = sy.ActionObject.from_obj(request).send(self.scientist)
        try:
            result = getattr(self.scientist.code, self.function)(records=self.asset, request=argument)
        except sy.SyftException as err:  # the datasite's server failed: the client drops out of this round
            result = err
        reply = result.get() if hasattr(result, "get") else result
        if not isinstance(reply, dict):
            message = first_line(reply) if quote_errors else "(message withheld: it may quote private data)"
            raise ClientFailure(f"datasite {self.name!r} failed: {message}")
        return reply

    def close(self) -> None:
        self.server.land()


@contextlib.contextmanager
def spawned_processes() -> Iterator[None]:
    """New processes start from a fresh interpreter (``spawn``), not as a copy of this one (``fork``), inside."""
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)
    try:
        yield
    finally:
        multiprocessing.set_start_method(before, force=True)


def load_function(name: str, source: str) -> Any:
    """The function of ``source``, from a file (PySyft reads a function's source text to submit it)."""
    path = Path(tempfile.mkdtemp(prefix="fl_dp_syft_")) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def first_line(value: Any) -> str:
    """The first line of a reply that is not one (a PySyft error), for a one-line message."""
    return (str(value).strip().splitlines() or [""])[0][:300]


class SyftClients:
    """Trains a round's clients inside their datasites; the strategy's client engine for ``client.runtime=syft``.

    Args:
        module: the LightningModule; its current weights are the round's global weights.
        optimizer: its SGD optimizer (which parameters train, their settings, read every round).
        datasets: each client's ``TensorDataset(inputs, targets)``, uploaded once to its datasite.
        clients: each client's state on the server (a mirror: the datasite keeps the real one).
        engine, privacy: as for the local vectorized engine.
        config: the datasites (ports, approval, approved rounds, timeout).
        batch_size, local_epochs, overrides, seed: what :func:`~fl_dp_lightning.runtime.client.make_client` gets.
        release_outputs: whether training metrics and error messages computed from the records may come back
            (no DP at all, or the unsafe opt-in).
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        datasets: Mapping[str, TensorDataset],
        clients: Sequence[ClientState],
        *,
        engine: EngineConfig,
        privacy: PrivacyConfig,
        config: SyftConfig,
        batch_size: int,
        local_epochs: int,
        overrides: Mapping[str, ClientOverride],
        seed: int,
        release_outputs: bool,
    ):
        self.module, self.optimizer, self.config = module, optimizer, config
        self.spec = module_spec(module)
        names = {id(p): n for n, p in module.named_parameters()}
        self.groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        self.index = {c.name: i for i, c in enumerate(clients)}
        self.session = secrets.token_hex(8)
        self.common = {
            "session": self.session,
            "model": self.spec,
            "groups": self.groups,
            "privacy": asdict(privacy),
            "engine": asdict(engine),
            "batch_size": batch_size,
            "local_epochs": local_epochs,
            "seed": seed,
            "approved_rounds": config.approved_rounds,
            "max_epsilon": privacy.max_epsilon if privacy.max_epsilon is not None else privacy.target_epsilon,
            "release_metrics": release_outputs,
        }
        self.overrides = overrides
        self.quote_errors = release_outputs
        self.approvals: dict[str, int] = {}
        self.started: set[str] = set()
        """The clients whose round reached their datasite in the current round."""
        self.sites: dict[str, Datasite] = {}
        port = config.port
        for i, (name, dataset) in enumerate(datasets.items()):
            self.sites[name] = Datasite(name, dataset, None if port is None else port + i)

    def terms(self, client: ClientState, approval: int) -> dict[str, Any]:
        """What the owner of ``client``'s datasite approves for approval number ``approval``."""
        override = self.overrides.get(client.name) or ClientOverride()
        return {
            **self.common,
            "client": client.name,
            "index": self.index[client.name],
            "approval": approval,
            "override": asdict(override),
            "noise_multiplier": client.noise_multiplier,
            # what the client spent before this session (a resumed run): its accountant starts from it
            "history": [] if client.accountant is None else [list(entry) for entry in client.accountant.history],
            "steps_taken": client.steps_taken,
        }

    def _ask(self, client: ClientState) -> None:
        """Asks the owner to approve the next batch of rounds (the first, or when an approval ran out)."""
        approval = self.approvals.get(client.name, 0) + 1
        name = f"fl_dp_round_{approval}"
        source = APPROVED_CODE.format(name=name, client=client.name, terms=pformat(self.terms(client, approval)))
        self.sites[client.name].request(name, source, self.config.approval, self.config.timeout_s)
        self.approvals[client.name] = approval

    def _round(self, client: ClientState, request: dict[str, Any]) -> dict[str, Any]:
        """The client's reply to ``request``, asking its owner first when no approval is in force."""
        site = self.sites[client.name]
        if site.function is None:
            self._ask(client)
        self.started.add(client.name)  # from here on the datasite may spend privacy
        reply = site.run(request, self.quote_errors)
        if reply.get("refused") == APPROVAL_USED:
            self._ask(client)
            reply = site.run(request, self.quote_errors)
        if "refused" in reply:
            raise ClientFailure(f"datasite {client.name!r} refused the round: {reply['reason']}")
        return reply

    def _reply(self, client: ClientState, request: dict[str, Any]) -> dict[str, Any]:
        """:meth:`_round` within ``client.syft.timeout_s`` (a late datasite's thread is left behind, not waited for)."""
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        try:
            return pool.submit(self._round, client, request).result(timeout=self.config.timeout_s)
        except concurrent.futures.TimeoutError:
            raise ClientFailure(
                f"datasite {client.name!r} did not answer within client.syft.timeout_s={self.config.timeout_s:g}"
            ) from None
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def train(self, asked: RoundRequest, clients: Sequence[ClientState]) -> Iterator[ClientUpdate]:
        """Each client's round in its datasite, from the module's current (global) weights."""
        state = self.module.state_dict()
        request = {
            "weights": {name: value.detach().cpu().numpy() for name, value in state.items()},
            "sgd": [{k: g[k] for k in SGD_SETTINGS} for g in self.optimizer.param_groups],
            "proximal_mu": asked.proximal_mu,
            "round": asked.round,
        }
        trained = {name for group in self.groups for name in group}
        self.started = set()
        for client in clients:
            try:
                reply = self._reply(client, request)
            except ClientFailure as err:
                if client.name in self.started:
                    self._count_unconfirmed(client)
                yield ClientUpdate(client.name, asked.round, None, client.num_examples, 0, failure=str(err))
                continue
            steps = client.steps_taken
            self._mirror(client, reply)
            params = {n: torch.as_tensor(np.asarray(v)) for n, v in reply["params"].items() if n in trained}
            metrics = dict(reply["metrics"]) if asked.release_metrics else {}
            yield ClientUpdate(
                client.name, asked.round, params, client.num_examples, client.steps_taken - steps, metrics
            )

    @staticmethod
    def _count_unconfirmed(client: ClientState) -> None:
        """A round that started but did not answer may have trained: the server counts it (an upper bound), so its
        epsilon never reads below the datasite's; the datasite's next reply brings the exact history back."""
        if client.accountant is not None:
            client.accountant.history.append((client.noise_multiplier, client.sample_rate, client.steps_per_round))

    @staticmethod
    def _mirror(client: ClientState, reply: dict[str, Any]) -> None:
        """The server's copy of the datasite's accountant and step count (for budgets, reports, checkpoints)."""
        if client.accountant is not None:
            client.accountant.history = [tuple(entry) for entry in reply["history"]]
        client.steps_taken = int(reply["steps_taken"])

    def close(self) -> None:
        """Shuts the datasites down."""
        for site in self.sites.values():
            site.close()
