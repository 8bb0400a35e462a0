"""FederatedRounds: one Lightning epoch is one round of federated DP-SGD (the Lightning hooks, in lifecycle order).

The strategy serves each round's batches client after client (the batch index says whose batch it is, so
Lightning's prefetching does not matter). The client side is a runtime (:mod:`fl_dp_lightning.runtime`): Opacus
inside this batch loop, or the vectorized engine and PySyft datasites, which train the round's clients in one
batch. Each hands the server one :class:`~fl_dp_lightning.update.ClientUpdate` per client; the server's end of the
round (:mod:`fl_dp_lightning.server.round`) averages them and loads the result before validation and checkpoints.
What may leave a client is decided in :mod:`fl_dp_lightning.strategy.release`.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Iterator, Mapping
from itertools import islice
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor
from typing_extensions import override

from fl_dp_lightning.audit.dirac import DiracCanaries
from fl_dp_lightning.callbacks import FederatedLogger
from fl_dp_lightning.checkpoint import VerifiedCheckpointIO
from fl_dp_lightning.config import (
    ClientOverride,
    ConfigError,
    EngineConfig,
    PrivacyConfig,
    SecureAggregationConfig,
    ServerConfig,
    SyftConfig,
    UserPrivacyConfig,
)
from fl_dp_lightning.data.datamodule import ClientDatasets
from fl_dp_lightning.privacy.per_example import channels_last
from fl_dp_lightning.runtime.base import ClientRuntime
from fl_dp_lightning.runtime.client import ClientState, make_client
from fl_dp_lightning.runtime.opacus import OpacusRuntime
from fl_dp_lightning.runtime.sampling import on_device, take_batch
from fl_dp_lightning.runtime.syft.clients import SyftClients, import_syft
from fl_dp_lightning.server.plan import RoundPlan, clients_per_round, over_budget, plan_round
from fl_dp_lightning.server.round import Aggregate, open_aggregate
from fl_dp_lightning.server.user_level import UserLevelDP
from fl_dp_lightning.strategy.building import RunParts
from fl_dp_lightning.strategy.checks import (
    check_finite_epsilon,
    check_options,
    check_settings,
    check_syft,
    check_trainer,
)
from fl_dp_lightning.strategy.loader import WHOLE_ROUND, RoundIterable, followed_by
from fl_dp_lightning.strategy.release import ReleaseRules
from fl_dp_lightning.strategy.resume import ResumableRounds
from fl_dp_lightning.strategy.server_side import ServerSide
from fl_dp_lightning.update import ClientUpdate, RoundRequest


class FederatedRounds(ServerSide, ReleaseRules, RunParts, ResumableRounds):
    """The round logic shared by the single-process and the multi-process strategies (a mixin placed before a
    Lightning strategy). The multi-process strategy overrides the three extension points below."""

    def __init__(
        self,
        *,
        privacy: PrivacyConfig | None = None,
        server: ServerConfig | None = None,
        engine: str | EngineConfig = "opacus",
        user_privacy: UserPrivacyConfig | None = None,
        secure_aggregation: SecureAggregationConfig | None = None,
        local_epochs: int = 1,
        client_fraction: float = 1.0,
        client_sampling: str = "uniform",
        proximal_mu: float = 0.0,
        client_overrides: Mapping[str, ClientOverride] | None = None,
        on_client_failure: str = "drop",
        client_time_limit: float | None = None,
        syft: SyftConfig | None = None,
        seed: int = 0,
        log_rounds: bool = True,
        **lightning: Any,
    ):
        check_settings(type(self), FederatedRounds.__init__, lightning)
        self._lightning_given = {k for k, v in lightning.items() if v is not None}
        lightning = {k: lightning[k] for k in self._lightning_given}
        lightning.setdefault("checkpoint_io", VerifiedCheckpointIO())  # atomic writes, verified on load
        super().__init__(**lightning)
        self.privacy = privacy if privacy is not None else PrivacyConfig()
        self.engine = EngineConfig(name=engine) if isinstance(engine, str) else engine
        self.user_privacy = user_privacy if user_privacy is not None else UserPrivacyConfig()
        self.client_overrides = dict(client_overrides or {})
        check_options(
            privacy=self.privacy,
            user_privacy=self.user_privacy,
            vectorized=self.vectorized,
            local_epochs=local_epochs,
            client_fraction=client_fraction,
            client_sampling=client_sampling,
            on_client_failure=on_client_failure,
            client_time_limit=client_time_limit,
            proximal_mu=proximal_mu,
            client_overrides=self.client_overrides,
        )
        self.secure_aggregation = secure_aggregation if secure_aggregation is not None else SecureAggregationConfig()
        self.syft = syft
        if syft is not None:
            import_syft()
            check_syft(vectorized=self.vectorized, secure_aggregation=self.secure_aggregation)
        self.datasites: dict[str, Any] = {}
        """Under ``client.runtime=syft``, each client's :class:`~fl_dp_lightning.runtime.syft.clients.Datasite`
        (its ``owner`` client answers requests); kept after the run for inspection."""
        self.user_level: UserLevelDP | None = None
        self.canary_clients: DiracCanaries | None = None
        """An audit's canary clients under user-level DP (audit runs only)."""
        # under DP-FedAvg who takes part is part of the mechanism: drawn secretly unless seeded by opt-in; DP-FTRL
        # needs no secret schedule (and a resumed run must keep each client to its one round an epoch)
        seeded = self.privacy.unsafe_seeded_randomness or not self.user_privacy.enabled
        seeded = seeded or self.user_privacy.mechanism == "dp_ftrl"
        self._sampling_seed = seed if seeded else secrets.randbits(62)
        self.server = server if server is not None else ServerConfig()
        self.server_state: dict[str, Tensor] = {}
        self.local_epochs = local_epochs
        self.client_fraction = client_fraction
        self.client_sampling = client_sampling
        self.proximal_mu = proximal_mu
        self.on_client_failure = on_client_failure
        self.client_time_limit = client_time_limit
        self.faults: list[dict[str, Any]] = []
        self.seed = seed
        self.log_rounds = log_rounds
        self.clients: dict[str, ClientState] = {}
        self.holdouts: dict[str, Any] = {}
        self._holdout_batch_size = 1
        self.last_round: list[ClientUpdate] = []
        """The round's client updates as released (their parameters are in the average)."""
        self._loop: OpacusRuntime | None = None
        self._batch_runtime: ClientRuntime | None = None
        self._restored: dict[str, Any] | None = None
        self._plan: RoundPlan | None = None
        self._local_plan: RoundPlan | None = None
        self._round_total = 0
        self._global_state: dict[str, Tensor] = {}
        self._average: Aggregate | None = None
        self._batch_idx = -1
        self._empty_batch = False
        self._records = 0
        """Records in the current batch."""
        self._padding = False
        self._relaid: list[Tensor] = []
        self.withheld_logs: set[str] = set()
        self.planned_rounds: int | None = None
        self.rounds_trained = 0
        """Rounds in which clients trained (or, under user-level DP, the server released its noised mean)."""
        self.rounds_run = 0
        """Rounds run so far, also those no client joined: the current round's index."""
        self.updates_added = 0
        """Client updates this process added to a round's aggregate (a run where none ever was trained nothing)."""
        self._check_processes()

    # ------------------------------------------------- process extension points

    def _check_processes(self) -> None:
        """Refuses settings that one process cannot share with others (none in one process)."""

    def _rank_plan(self, plan: RoundPlan) -> RoundPlan:
        """The part of the round this process trains (all of it in one process)."""
        return plan

    def _rank_round_length(self, plan: RoundPlan) -> int:
        """Batches this process iterates in the round (processes must agree: Lightning syncs every step);
        a vectorized round is one batch."""
        return int(bool(plan.segments)) if self.vectorized else plan.num_batches

    def _combine_round(self) -> None:
        """Combines the processes' partial FedAvg sums and client states (nothing to do in one process)."""

    # ----------------------------------------------------------------- setup

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            check_trainer(trainer, self.lightning_module.automatic_optimization, self.privacy)
            if self.privacy.enabled and self.privacy.fix_modules:
                self._fix_modules()  # before configure_optimizers sees the parameters
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if len(self.optimizers) != 1:
            raise ConfigError(
                f"FederatedDPStrategy trains with exactly one optimizer; configure_optimizers returned "
                f"{len(self.optimizers)}. Return a single optimizer."
            )
        if not self.vectorized:
            if self.engine.channels_last_on(self.root_device):
                # same values and Parameter objects in a faster layout; teardown gives the module its own back
                self._relaid = [p for p in self.lightning_module.parameters() if p.dim() == 4 and p.is_contiguous()]
                for param in self._relaid:
                    param.data = channels_last(param.data)
            self._loop = OpacusRuntime(self.privacy, self.releases_client_outputs)
            if self.privacy.enabled:
                self.optimizers = [self._loop.make_private(self.lightning_module, self.optimizers[0])]
        if not self.releases_client_outputs:
            self._withhold_logs()
        if self.log_rounds and not any(isinstance(cb, FederatedLogger) for cb in trainer.callbacks):
            trainer.callbacks.append(FederatedLogger())

    @override
    def process_dataloader(self, dataloader: object) -> object:
        if isinstance(dataloader, ClientDatasets):
            self._bind_clients(dataloader)
            return RoundIterable(self)
        trainer = self.lightning_module.trainer
        if trainer.state.stage == RunningStage.TRAINING:
            raise TypeError(
                f"FederatedDPStrategy needs per-client training data, got {type(dataloader).__name__}: use "
                "FederatedDataModule, or return ClientDatasets({client: dataset}, batch_size) from "
                "train_dataloader()."
            )
        return dataloader

    def _bind_clients(self, data: ClientDatasets) -> None:
        if self.clients:
            if list(self.clients) != list(data.datasets):
                raise ConfigError(f"clients changed during training: {list(self.clients)} -> {list(data.datasets)}")
            return
        for weakness in self.privacy.weakened_by():
            warnings.warn(f"the privacy guarantee is weakened by {weakness}", stacklevel=2)
        self.holdouts, self._holdout_batch_size = data.holdouts, data.batch_size
        # the vectorized engine keeps its own copy of the data on the device
        datasets = data.datasets if self.vectorized else on_device(data.datasets, self.root_device)
        self.clients = {
            name: make_client(
                name,
                index,
                dataset,
                privacy=self.privacy,
                batch_size=data.batch_size,
                local_epochs=self.local_epochs,
                override=self.client_overrides.get(name),
                seed=self.seed,
                device=self.root_device,
            )
            for index, (name, dataset) in enumerate(datasets.items())
        }
        if self._loop is not None and self._loop.optimizer is not None:
            self._probe_sensitivity(data)
        if self.syft is not None:
            self._batch_runtime = self._make_syft(data)
            self.datasites = self._batch_runtime.sites
        elif self.vectorized:  # per-example losses by construction: each record is its own forward
            self._batch_runtime = self._make_vectorized(data)
        if self.user_privacy.enabled:
            self.user_level = self._make_user_level()
        if self.privacy.enabled and self.privacy.target_epsilon is not None and self._restored is None:
            self._calibrate_noise()  # on resume the checkpoint carries the noise chosen at the start
        if self._restored is not None:
            self._load_clients(self._restored)
        clients = list(self.clients.values())
        check_finite_epsilon(self.privacy, clients, self.user_level, self.user_privacy, self._planned_rounds())

    def _planned_rounds(self) -> int:
        rounds = self.lightning_module.trainer.max_epochs
        return rounds if rounds is not None and rounds > 0 else 1

    @property
    def vectorized(self) -> bool:
        """Whether the round's clients train at once (``engine=vectorized``) instead of one after the other."""
        return self.engine.name == "vectorized"

    # ------------------------------------------------------------ one round

    def _full_plan(self, round_idx: int) -> RoundPlan:
        steps = {name: c.steps_per_round for name, c in self.clients.items()}
        return plan_round(steps, self.client_fraction, round_idx, self._sampling_seed, sampling=self.client_sampling)

    def round_length(self) -> int | None:
        """Batches in every round, or ``None`` when it varies with the sampled clients."""
        steps = {c.steps_per_round for c in self.clients.values()}
        every_client = clients_per_round(len(self.clients), self.client_fraction) == len(self.clients)
        if self.privacy.enabled and self.privacy.max_epsilon is not None:
            return None  # clients over budget sit out
        if self.client_sampling != "uniform":
            return None  # a random number of clients each round
        if every_client or len(steps) == 1:
            return self._rank_round_length(self._full_plan(0))
        return None

    def round_batches(self) -> Iterator[Any]:
        """This process's batches of the current round, client after client, then empty padding batches
        up to the length all processes share (starts the round when first advanced)."""
        self._start_round()
        if self.vectorized:
            yield from [WHOLE_ROUND] * self._round_total
        else:
            for name, _ in self._local_plan.segments:
                client = self.clients[name]
                # exactly its steps, as a plain Lightning loop takes an epoch's batches (a shuffling sampler is left
                # before its closing draw), so that every engine leaves a client's sampler stream in the same state
                for indices in islice(client.batch_indices(), client.steps_per_round):
                    yield take_batch(client.dataset, indices)
            padding = take_batch(next(iter(self.clients.values())).dataset, [])
            for _ in range(self._round_total - self._local_plan.num_batches):
                yield padding
        if self._round_total == 0 and self._plan is not None:
            self._end_empty_round()

    @property
    def round_index(self) -> int:
        """The current (0-based) round: the rounds this run has trained, restored from a checkpoint on resume (it
        decides the round's client draw, so that a resumed run draws what the uninterrupted run drew)."""
        return self.rounds_run

    def _start_round(self) -> RoundPlan:
        trainer = self.lightning_module.trainer
        round_no = self.round_index + 1
        sampled = self._full_plan(self.round_index)
        self._plan = self._within_budget(sampled)
        self._local_plan = self._rank_plan(self._plan)
        self._round_total = self._rank_round_length(self._plan)
        self.last_round = []
        if not self._plan.segments and sampled.segments:
            rank_zero_info(f"round {round_no}: no client can train within the budget; stopping")
            trainer.should_stop = True
            self._plan = None  # no round ran
            return sampled
        if not sampled.segments and self.user_level is None:
            rank_zero_info(f"round {round_no}: no client was sampled; the global model stays as it is")
            return self._plan
        self._global_state = {k: v.detach().clone() for k, v in self.lightning_module.state_dict().items()}
        if self._loop is not None:
            self._loop.start_round(self.optimizers[0], trainer.lr_scheduler_configs)
        # under DP only parameters leave a client: buffers keep their global values
        private = self.privacy.enabled or self.user_level is not None
        params = {name for name, _ in self.lightning_module.named_parameters()} if private else None
        clients = self._local_plan.clients
        if self.secure_aggregation.enabled:  # masks are set up among the round's clients before they train
            self._check_secure_capacity(len(clients))
        seed = self._sampling_seed + self.round_index  # the neighbour graph is public
        self._average = open_aggregate(self._global_state, params, clients, self.secure_aggregation, seed)
        return self._plan

    def _within_budget(self, plan: RoundPlan) -> RoundPlan:
        """Leaves out the clients whose epsilon would pass ``privacy.max_epsilon`` in this round."""
        budget = self.privacy.max_epsilon
        if not self.privacy.enabled or budget is None:
            return plan
        over = over_budget(plan, self.clients, self.privacy.delta, budget)
        # who sits out (and how many) follows from who took part before: kept in where participation is withheld
        for name, eps in over.items() if not self.participation_withheld else ():
            rank_zero_info(
                f"round {plan.round_idx + 1}: client {name!r} sits out: this round would bring its epsilon to "
                f"{eps:.4f} > privacy.max_epsilon={budget}"
            )
        return plan.without(set(over)) if over else plan

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self._batch_idx = batch_idx
        if self.vectorized:
            return
        loop = self._loop
        self._padding = batch_idx >= self._local_plan.num_batches
        name = self._local_plan.starts.get(batch_idx)
        if name is not None:
            self._begin_client(self.clients[name])
        elif loop.client is not None and not loop.failed and self.client_time_limit is not None:
            elapsed = loop.elapsed()
            if elapsed > self.client_time_limit:
                reason = f"it ran past the time limit of {self.client_time_limit:g} s ({elapsed:.1f} s)"
                if self.on_client_failure == "raise":
                    raise ConfigError(
                        f"client.time_limit_s={self.client_time_limit:g}: a client {reason[3:]} (client.on_failure="
                        "raise; with drop the run goes on without it for this round)"
                    )
                loop.failure = reason
        # a dropped client's remaining batches are skipped: no update, no noise, no accounting
        self._padding = self._padding or loop.failed
        self._records = extract_batch_size(batch)
        self._empty_batch = self._records == 0 or loop.failed

    def _begin_client(self, client: ClientState) -> None:
        self.lightning_module.load_state_dict(self._global_state)
        schedulers = self.lightning_module.trainer.lr_scheduler_configs
        self._loop.begin(client, self.optimizers[0], schedulers, after_noise=self._add_proximal_gradient)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.vectorized:
            self._train_batch_runtime()
            return torch.zeros((), device=self.root_device, requires_grad=True)  # the round is done: no step
        if self._empty_batch:
            # Poisson sampling drew no record: the DP step must still add noise and be accounted,
            # but the user's step would average an empty loss into NaN.
            return torch.zeros((), device=self.root_device, requires_grad=True)
        try:
            output = super().training_step(*args, **kwargs)
        except ConfigError:
            raise
        except Exception as err:  # a client's failure: its round is dropped, or the run fails, by option
            if self.on_client_failure == "raise" or self._loop.client is None:
                raise
            # the message of an error raised on a client's records may quote them: under DP only its type leaves
            released = self.releases_client_outputs
            withheld = " (message withheld: it may quote private data)"
            self._loop.failure = f"{type(err).__name__}" + (f": {err}" if released else withheld)
            # this step becomes an empty DP step: noise added and accounted (conservative), the weights discarded
            self._empty_batch = True
            return torch.zeros((), device=self.root_device, requires_grad=True)
        self._loop.record_metrics(output)
        return output

    def _train_batch_runtime(self) -> None:
        clients = [self.clients[name] for name, _ in self._local_plan.segments]
        request = RoundRequest(self.round_index + 1, self.proximal_mu, self.releases_client_outputs)
        for update in self._batch_runtime.train(request, clients):
            if update.failure is not None and self.on_client_failure == "raise":  # a datasite denied, failed, ...
                raise ConfigError(
                    f"client {update.client!r}: {update.failure} (client.on_failure=raise; with drop the "
                    "run goes on without it for this round)"
                )
            self._add_update(update)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        if self._loop is None:  # a vectorized round's one batch: the clients trained in training_step
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        if self._empty_batch and self._loop.optimizer is not None:
            self._loop.empty_backward()
            loss = closure_loss
        else:
            loss = super().backward(closure_loss, optimizer, *args, **kwargs)
        if not self._padding:
            self._loop.after_backward(dict(self.lightning_module.named_parameters()), self._records)
        return loss

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        if self.vectorized:  # the clients stepped inside training_step; the round's one batch ends it
            output = closure()
            self._end_round()
            return output
        if self._padding:
            output = closure()  # keeps Lightning's loop in step with the other processes; no update, no noise
        else:
            if self._loop.optimizer is None and self.proximal_mu:
                closure = followed_by(closure, self._add_proximal_gradient)  # under DP: in the step hook
            output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self._loop.after_step(stepped=not self._padding)
        if self._batch_idx in self._local_plan.ends:
            self._end_client()
        if self._batch_idx == self._round_total - 1:
            self._end_round()
        return output

    def _add_proximal_gradient(self) -> None:
        """FedProx: adds ``mu * (w - w_global)``, the gradient of ``mu / 2 * ||w - w_global||^2``, to each
        parameter's gradient. Under DP it is added after clipping and noise: it depends on the parameters alone
        (which per-example gradients never see), so it costs no privacy."""
        if not self.proximal_mu:
            return
        for name, param in self.lightning_module.named_parameters():
            if param.grad is not None:
                param.grad.add_(param.detach() - self._global_state[name], alpha=self.proximal_mu)

    @override
    def teardown(self) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        for param in self._relaid:
            param.data = param.data.contiguous()
        self._relaid = []
        if self.lightning_module is not None:
            self.lightning_module.__dict__.pop("log", None)
        if isinstance(self._batch_runtime, SyftClients):
            self._batch_runtime.close()
            self._batch_runtime = None
        super().teardown()
