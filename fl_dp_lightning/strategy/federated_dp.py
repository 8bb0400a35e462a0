"""FederatedDPStrategy: one Lightning epoch is one round of federated DP-SGD.

Lightning trains one model instance. The strategy serves each round's batches client after client
(the batch index says whose batch it is, so Lightning's prefetching does not matter); at a client's first
batch it loads the global weights and switches the DP optimizer to that client's noise stream and
accountant; after the client's last optimizer step it adds the client's weights to a running FedAvg;
after the round's last step it loads the average, so that validation and checkpoints see the global model.

Under DP nothing computed from a client's records leaves it except its noised model: the module's training-stage
``self.log`` calls are withheld, raw gradients are dropped as soon as backward produces them (Opacus works from
per-example gradients), per-example gradients are cleared after every step, and only parameters are averaged.
``privacy.unsafe_release_training_metrics`` lifts this for debugging (and the privacy report says so).
"""

from __future__ import annotations

import copy
import math
import secrets
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from itertools import islice
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.types import _DEVICE
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.data import extract_batch_size
from opacus.optimizers import DPOptimizer
from torch import Tensor
from torch.utils.data import TensorDataset
from typing_extensions import override

from fl_dp_lightning.aggregation import RunningAverage, averaged_keys
from fl_dp_lightning.checkpoint import VerifiedCheckpointIO
from fl_dp_lightning.config import (
    CLIENT_FAILURES,
    CLIENT_SAMPLINGS,
    ClientOverride,
    ConfigError,
    EngineConfig,
    PrivacyConfig,
    SecureAggregationConfig,
    ServerConfig,
    SyftConfig,
    UserPrivacyConfig,
)
from fl_dp_lightning.data.datamodule import ClientDatasets, FederatedDataModule, RecordCount
from fl_dp_lightning.evaluation import evaluate_on
from fl_dp_lightning.privacy.accountants import epsilon_of_history
from fl_dp_lightning.privacy.calibration import calibrate_noise_multiplier
from fl_dp_lightning.privacy.layers import fix_layers, unsupported_layers
from fl_dp_lightning.privacy.per_example import ContiguousGradSampleModule, channels_last
from fl_dp_lightning.privacy.probe import check_sensitivity, probe_sizes, random_batch_like
from fl_dp_lightning.secure_aggregation import WEIGHT_HEADROOM, SecureSum, check_capacity
from fl_dp_lightning.server import apply_server_optimizer
from fl_dp_lightning.strategy.client import ClientReport, ClientState, make_client
from fl_dp_lightning.strategy.resume import ResumableRounds
from fl_dp_lightning.strategy.sampling import call_training_step, on_device, same_format, take_batch
from fl_dp_lightning.strategy.schedule import RoundPlan, clients_per_round, plan_round
from fl_dp_lightning.strategy.user_level import UserLevelDP
from fl_dp_lightning.syft_runtime.clients import SyftClients, import_syft
from fl_dp_lightning.vectorized.engine import VectorizedClients, check_vectorizable


class FederatedRounds(ResumableRounds):
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
        **kwargs: Any,
    ):
        kwargs.setdefault("checkpoint_io", VerifiedCheckpointIO())
        super().__init__(**kwargs)
        if local_epochs < 1:
            raise ConfigError(f"local_epochs={local_epochs}: must be >= 1")
        if not 0 < client_fraction <= 1:
            raise ConfigError(f"client_fraction={client_fraction}: must be in (0, 1]")
        if client_sampling not in CLIENT_SAMPLINGS:
            raise ConfigError(f"client_sampling={client_sampling!r}: choose one of {CLIENT_SAMPLINGS}")
        if on_client_failure not in CLIENT_FAILURES:
            raise ConfigError(f"on_client_failure={on_client_failure!r}: choose one of {CLIENT_FAILURES}")
        if client_time_limit is not None and not 0 < client_time_limit < math.inf:
            raise ConfigError(f"client_time_limit={client_time_limit}: must be > 0 seconds (or None)")
        if not 0 <= proximal_mu < math.inf:
            raise ConfigError(f"proximal_mu={proximal_mu}: must be >= 0 and finite")
        self.privacy = privacy if privacy is not None else PrivacyConfig()
        self.engine = EngineConfig(name=engine) if isinstance(engine, str) else engine
        self.user_privacy = user_privacy if user_privacy is not None else UserPrivacyConfig()
        if self.user_privacy.enabled and client_sampling == "uniform" and client_fraction < 1:
            raise ConfigError(
                f"client_fraction={client_fraction} with uniform client sampling: user-level DP is accounted for "
                "Poisson client sampling; set client.sampling=poisson (or every client in every round)"
            )
        self.user_level: UserLevelDP | None = None
        self.secure_aggregation = secure_aggregation if secure_aggregation is not None else SecureAggregationConfig()
        # under user-level DP who takes part is part of the mechanism: drawn secretly unless seeded by opt-in
        seeded = self.privacy.unsafe_seeded_randomness or not self.user_privacy.enabled
        self._sampling_seed = seed if seeded else secrets.randbits(62)
        if self.vectorized and client_time_limit is not None:
            raise ConfigError(
                f"client_time_limit={client_time_limit}: engine=vectorized trains a chunk of clients as one "
                "computation, so one client cannot be timed out; drop the limit or use engine=opacus"
            )
        self.syft = syft
        self.datasites: dict[str, Any] = {}
        """Under ``client.runtime=syft``, each client's :class:`~fl_dp_lightning.syft_runtime.clients.Datasite`
        (its ``owner`` client answers requests); kept after the run for inspection."""
        if syft is not None:
            self._check_syft()
        self.server = server if server is not None else ServerConfig()
        self.server_state: dict[str, Tensor] = {}
        self.local_epochs = local_epochs
        self.client_fraction = client_fraction
        self.client_sampling = client_sampling
        self.proximal_mu = proximal_mu
        self.client_overrides = dict(client_overrides or {})
        if self.privacy.target_epsilon is not None and any(o.noise_multiplier for o in self.client_overrides.values()):
            raise ConfigError(
                "client.overrides.*.noise_multiplier: privacy.target_epsilon calibrates every client's noise; "
                "drop the noise override or the target"
            )
        self.on_client_failure = on_client_failure
        self.client_time_limit = client_time_limit
        self.faults: list[dict[str, Any]] = []
        self._client_failed = False
        self._client_started = 0.0
        self.seed = seed
        self.log_rounds = log_rounds
        self.clients: dict[str, ClientState] = {}
        self.holdouts: dict[str, Any] = {}
        self._holdout_batch_size = 1
        self.last_round: list[ClientReport] = []
        self._dp_optimizer: DPOptimizer | None = None
        self._grad_sample_module: ContiguousGradSampleModule | None = None
        self._vectorized_clients: VectorizedClients | None = None
        self._restored: dict[str, Any] | None = None
        self._plan: RoundPlan | None = None
        self._local_plan: RoundPlan | None = None
        self._round_total = 0
        self._global_state: dict[str, Tensor] = {}
        self._average: RunningAverage | SecureSum = RunningAverage()
        self._client: ClientState | None = None
        self._metric_sums: dict[str, Tensor] = {}
        self._metric_steps = 0
        self._batch_idx = -1
        self._empty_batch = False
        self._padding = False
        self._round_schedule: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])
        self._probing = False
        self._grad_hooks: list[Any] = []
        self._relaid: list[Tensor] = []
        self.withheld_logs: set[str] = set()
        self.planned_rounds: int | None = None
        self.rounds_trained = 0
        """Rounds in which clients trained (or, under user-level DP, the server released its noised mean)."""
        self.rounds_run = 0
        """Rounds run so far, also those no client joined: the current round's index."""
        self.updates_added = 0
        """Client updates this process added to a round's aggregate (a run where none ever was trained nothing)."""

    def _check_syft(self) -> None:
        """Refuses what clients in PySyft datasites cannot run, before anything starts."""
        import_syft()
        if not self.vectorized:
            raise ConfigError(
                "client.runtime=syft runs the vectorized engine's client round inside each datasite: add "
                "engine=vectorized (FederatedDPStrategy(engine='vectorized', syft=...))"
            )
        if self.secure_aggregation.enabled:
            raise ConfigError(
                "secure_aggregation.enabled with client.runtime=syft: the masks would have to be added inside the "
                "datasites, which is not built yet; use secure_aggregation=none or client.runtime=local"
            )

    # ------------------------------------------------- process extension points

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
            self._check_trainer(trainer)
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
        if not self.vectorized and self.engine.channels_last_on(self.root_device):
            # same values and Parameter objects in a faster layout; teardown gives the module its own back
            self._relaid = [p for p in self.lightning_module.parameters() if p.dim() == 4 and p.is_contiguous()]
            for param in self._relaid:
                param.data = channels_last(param.data)
        if self.privacy.enabled and not self.vectorized:
            self._make_private()
        if not self.releases_client_outputs:
            self._withhold_private_outputs()
        if self.log_rounds:
            from fl_dp_lightning.callbacks import FederatedLogger

            if not any(isinstance(cb, FederatedLogger) for cb in trainer.callbacks):
                trainer.callbacks.append(FederatedLogger())

    def _check_trainer(self, trainer: pl.Trainer) -> None:
        """Refuses Trainer settings that would break a round or the privacy accounting, before training."""
        module = self.lightning_module
        problems = []
        if not module.automatic_optimization:
            problems.append(
                "manual optimization is not supported: the strategy must own each optimizer step to clip, "
                "noise and account it; use automatic optimization (self.automatic_optimization = True)"
            )
        if trainer.accumulate_grad_batches != 1:
            problems.append(
                f"accumulate_grad_batches={trainer.accumulate_grad_batches}: every step is accounted as one "
                "DP step; raise the batch size instead"
            )
        if self.privacy.enabled and trainer.gradient_clip_val:
            problems.append(
                f"gradient_clip_val={trainer.gradient_clip_val}: DP-SGD already clips each example's gradient "
                "at privacy.max_grad_norm; remove gradient_clip_val"
            )
        if trainer.fast_dev_run:
            problems.append(
                f"fast_dev_run={trainer.fast_dev_run}: it stops in the middle of a round, after the first client's "
                "first batches; for a quick check train one round on small data (trainer.rounds=1 data=synthetic)"
            )
        if trainer.max_steps != -1:
            problems.append(
                f"max_steps={trainer.max_steps}: a run must end at a round boundary; set the rounds with max_epochs"
            )
        if trainer.limit_train_batches not in (1.0, None):
            problems.append(
                f"limit_train_batches={trainer.limit_train_batches}: a round must run every client's steps; "
                "use fewer local epochs or a larger batch size"
            )
        if trainer.val_check_interval != 1.0:
            problems.append(
                f"val_check_interval={trainer.val_check_interval}: validation runs on the global model "
                "after each round; leave it at 1.0"
            )
        precision = str(trainer.precision)
        if self.privacy.enabled and precision in ("16-true", "bf16-true"):
            problems.append(
                f"precision={precision!r}: DP-SGD clips per-example gradients, whose norms need float32; "
                "use precision='bf16-mixed' (or '16-mixed', 32)"
            )
        if problems:
            raise ConfigError("FederatedDPStrategy cannot train with these settings: " + "; ".join(problems))

    def _fix_modules(self) -> None:
        """Replaces the layers DP-SGD cannot train, in place (see :mod:`fl_dp_lightning.privacy.layers`)."""
        changes = fix_layers(self.lightning_module, self.privacy.fix_norm)
        if any(change.startswith("replaced") for change in changes):
            warnings.warn(
                "privacy.fix_modules changed the model: " + "; ".join(changes) + ". Compare its accuracy without DP "
                "(privacy=none) and try privacy.fix_norm=auto|groupnorm|layernorm|identity",
                stacklevel=2,
            )
        for change in changes:
            rank_zero_info(f"privacy.fix_modules: {change}")

    def _make_private(self) -> None:
        """Wraps the module for per-sample gradients and the optimizer for clipping and noise."""
        module = self.lightning_module
        unsupported = unsupported_layers(module)
        if unsupported:
            raise ConfigError(
                f"{type(module).__name__} has layers DP-SGD cannot train: {unsupported} Fix: set "
                "privacy.fix_modules=true (PrivacyConfig(fix_modules=True)) to replace them in place (BatchNorm "
                "becomes GroupNorm, see privacy.fix_norm), or replace them in your module."
            )
        # torch warns whenever a first layer's input needs no gradient, which is every batch here: Opacus's hooks
        # need only the layer's output gradients
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        # Hooks go on the module's own layers; Lightning keeps calling the LightningModule itself.
        self._grad_sample_module = ContiguousGradSampleModule(
            module, batch_first=True, loss_reduction=self.privacy.loss_reduction, strict=True
        )
        self._dp_optimizer = DPOptimizer(
            self.optimizers[0],
            noise_multiplier=self.privacy.noise_multiplier,
            max_grad_norm=self.privacy.max_grad_norm,
            expected_batch_size=1,  # set per client in _begin_client
            loss_reduction=self.privacy.loss_reduction,
            secure_mode=self.privacy.secure_mode,
        )
        self.optimizers = [self._dp_optimizer]

    def _withhold_private_outputs(self) -> None:
        """Keeps the client's private intermediate values in: training-stage ``self.log`` and, under record-level
        DP, raw gradients."""
        module = self.lightning_module
        release = module.log

        def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            if module.trainer.training:
                self.withheld_logs.add(name)  # computed from a client's records without noise
                return
            release(name, value, *args, **kwargs)

        module.log = log  # log_dict goes through it too
        if not self.privacy.enabled:  # user-level DP alone: the client's optimizer steps on the plain gradient
            return
        # the summed, unclipped gradient must not outlive backward (Opacus uses the per-example ones)
        self._grad_hooks = [
            p.register_post_accumulate_grad_hook(self._drop_grad) for p in module.parameters() if p.requires_grad
        ]

    def _drop_grad(self, param: Tensor) -> None:
        if not self._probing:  # the probe compares the module's own gradient with the per-example ones
            param.grad = None

    @override
    def process_dataloader(self, dataloader: object) -> object:
        if isinstance(dataloader, ClientDatasets):
            self._bind_clients(dataloader)
            return _RoundIterable(self)
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
        if self._grad_sample_module is not None:
            self._probe_sensitivity(data)
        if self.syft is not None:
            self._vectorized_clients = self._make_syft(data)
            self.datasites = self._vectorized_clients.sites
        elif self.vectorized:  # per-example losses by construction: each record is its own forward
            self._vectorized_clients = self._make_vectorized(data)
        if self.user_privacy.enabled:
            self.user_level = self._make_user_level()
        if self.privacy.enabled and self.privacy.target_epsilon is not None and self._restored is None:
            self._calibrate_noise()  # on resume the checkpoint carries the noise chosen at the start
        if self._restored is not None:
            self._load_clients(self._restored)
        self._check_finite_epsilon()

    def _planned_rounds(self) -> int:
        rounds = self.lightning_module.trainer.max_epochs
        return rounds if rounds is not None and rounds > 0 else 1

    def _check_finite_epsilon(self) -> None:
        """Refuses, before any step, a delta at which the accountant cannot give a finite epsilon for the planned
        rounds (a run would print epsilon = inf as its guarantee)."""
        rounds = self._planned_rounds()
        if self.privacy.enabled and self.privacy.poisson_sampling and self.privacy.accountant != "gdp":
            clients = list(self.clients.values())
            # epsilon grows with the sample rate and steps and falls with the noise: one bound for every client
            worst_setting = (
                min(c.noise_multiplier for c in clients),
                max(c.sample_rate for c in clients),
                rounds * max(c.steps_per_round for c in clients),
            )
            worst = epsilon_of_history(type(clients[0].accountant), [worst_setting], self.privacy.delta)
            for client in clients if not math.isfinite(worst) else ():
                if not math.isfinite(client.epsilon_if_every_round(rounds, self.privacy.delta)):
                    raise ConfigError(
                        f"privacy.delta={self.privacy.delta:g}: the {self.privacy.accountant} accountant gives "
                        f"epsilon = inf for client {client.name!r} over {rounds} rounds at this delta; raise "
                        "privacy.delta (e.g. 1e-5, below 1/n)"
                    )
        if self.user_level is not None and not math.isfinite(self.user_level.epsilon_after(rounds)):
            raise ConfigError(
                f"user_privacy.delta={self.user_privacy.delta:g}: the {self.user_privacy.accountant} accountant gives "
                f"epsilon = inf over {rounds} rounds at this delta; raise user_privacy.delta (e.g. 1e-5, below "
                "1 / clients)"
            )

    @property
    def vectorized(self) -> bool:
        """Whether the round's clients train at once (``engine=vectorized``) instead of one after the other."""
        return self.engine.name == "vectorized"

    def _check_vectorizable(self, data: ClientDatasets) -> None:
        trainer = self.lightning_module.trainer
        step_schedules = sum(1 for c in trainer.lr_scheduler_configs if c.interval == "step")
        check_vectorizable(
            self.lightning_module, self.optimizers[0], step_schedules, data.datasets, str(trainer.precision)
        )

    def _make_vectorized(self, data: ClientDatasets) -> VectorizedClients:
        self._check_vectorizable(data)
        optimizer = self.optimizers[0]
        return VectorizedClients(
            self.lightning_module,
            optimizer,
            data.datasets,
            list(self.clients.values()),
            engine=self.engine,
            privacy=self.privacy,
            device=self.root_device,
            public=data.public if isinstance(data.public, TensorDataset) else None,
        )

    def _make_syft(self, data: ClientDatasets) -> SyftClients:
        self._check_vectorizable(data)
        if self.holdouts:
            raise ConfigError(
                "client.holdout_fraction with client.runtime=syft: the held-out records would have to be evaluated "
                "inside each datasite, which is not built yet; set client.holdout_fraction=0"
            )
        clients = SyftClients(
            self.lightning_module,
            self.optimizers[0],
            data.datasets,
            list(self.clients.values()),
            engine=self.engine,
            privacy=self.privacy,
            config=self.syft,
            batch_size=data.batch_size,
            local_epochs=self.local_epochs,
            overrides=self.client_overrides,
            seed=self.seed,
            release_outputs=self.releases_client_outputs,
        )
        if self.syft.port is None:
            warnings.warn(
                "client.runtime=syft with client.syft.port=null runs every datasite inside this process: a "
                "simulation with no isolation (this process can read every record and any datasite's state); set "
                "client.syft.port for datasites in their own processes",
                stacklevel=2,
            )
        else:  # the records now live in the datasites' processes: this one keeps their counts only
            for client in self.clients.values():
                client.dataset = RecordCount(client.num_examples)
            data.hand_over_records()
            datamodule = self.lightning_module.trainer.datamodule
            if isinstance(datamodule, FederatedDataModule):
                datamodule.hand_over_records()
        return clients

    def _make_user_level(self) -> UserLevelDP:
        count = len(self.clients)
        if self.user_privacy.delta >= 1 / count:
            raise ConfigError(
                f"user_privacy.delta={self.user_privacy.delta:g} is not below 1 / clients = 1/{count}: a delta that "
                f"large permits releasing one client's data outright; set user_privacy.delta well below "
                f"{1 / count:.2g} (e.g. 1e-5)"
            )
        poisson = self.client_sampling == "poisson"
        user_level = UserLevelDP(
            self.user_privacy,
            sample_rate=self.client_fraction if poisson else 1.0,
            num_clients=len(self.clients),
            seeded=self.privacy.unsafe_seeded_randomness,
            seed=self.seed,
            device=self.root_device,
        )
        if self.user_privacy.target_epsilon is not None and self._restored is None:
            rounds = self.lightning_module.trainer.max_epochs
            if rounds is None or rounds < 1:
                raise ConfigError("user_privacy.target_epsilon needs a finite number of rounds: set max_epochs")
            sigma = user_level.calibrate(rounds)
            rank_zero_info(
                f"user_privacy.target_epsilon={self.user_privacy.target_epsilon} over {rounds} rounds: server noise "
                f"multiplier {sigma:.4f} (replaces user_privacy.noise_multiplier={self.user_privacy.noise_multiplier})"
            )
        return user_level

    def _probe_sensitivity(self, data: ClientDatasets) -> None:
        """Refuses, before any step, modules whose per-example gradients would not bound a record's influence."""
        module = self.lightning_module
        guard = module.__dict__.get("log")
        module.log = _no_log  # the probe's records are nobody's metrics
        self._probing = True
        try:
            check_sensitivity(
                module,
                lambda batch: call_training_step(module, batch),
                self._probe_batches(data),
                sizes=probe_sizes([c.batch_size for c in self.clients.values()]),
                loss_reduction=self.privacy.loss_reduction,
            )
        except RuntimeError as err:
            if "BackwardHookFunction" not in str(err):
                raise
            raise ConfigError(
                "the module's forward modifies a layer's output in place (for example torchvision ResNet's "
                "`out += identity`), which Opacus's per-sample-gradient hooks cannot follow; nothing was trained. "
                "Fix: write it out of place (`out = out + identity`), e.g. fl_dp_lightning.models.resnet18_groupnorm()."
            ) from err
        finally:
            self._probing = False
            if guard is None:
                del module.log
            else:
                module.log = guard

    def _probe_batches(self, data: ClientDatasets) -> Callable[[int], Any]:
        """The probe's batches of a given size: records of the public set where it has the clients' format (their
        scale and classes), else random records shaped like a client's (no client record is read)."""
        template = take_batch(next(iter(data.datasets.values())), [])  # structure only: zero records
        public = data.public if data.public is not None and same_format(data.public, template) else None
        generator = torch.Generator().manual_seed(0)

        def batch(size: int) -> Any:
            if public is not None:
                drawn = take_batch(public, torch.randint(len(public), (size,), generator=generator).tolist())
            else:
                drawn = random_batch_like(template, size, generator, data.num_classes)
            return self.batch_to_device(drawn)

        return batch

    def _calibrate_noise(self) -> None:
        """Sets each client's noise multiplier so that all planned rounds spend ``privacy.target_epsilon``."""
        rounds = self.lightning_module.trainer.max_epochs
        if rounds is None or rounds < 1:
            raise ConfigError("privacy.target_epsilon needs a finite number of rounds: set Trainer(max_epochs=...)")
        self.planned_rounds = rounds
        chosen = {}
        for client in self.clients.values():
            client.noise_multiplier = calibrate_noise_multiplier(
                target_epsilon=self.privacy.target_epsilon,
                delta=self.privacy.delta,
                sample_rate=client.sample_rate,
                steps=rounds * client.steps_per_round,
                accountant=self.privacy.accountant,
                conversion=self.privacy.rdp_conversion,
            )
            chosen[client.name] = round(client.noise_multiplier, 4)
        rank_zero_info(
            f"privacy.target_epsilon={self.privacy.target_epsilon} over {rounds} rounds: calibrated noise multipliers "
            f"{chosen} (these replace privacy.noise_multiplier={self.privacy.noise_multiplier})"
        )

    # ------------------------------------------------------------ one round

    def _full_plan(self, round_idx: int) -> RoundPlan:
        steps = {name: c.steps_per_round for name, c in self.clients.items()}
        poisson = self.client_sampling == "poisson"
        return plan_round(steps, self.client_fraction, round_idx, self._sampling_seed, poisson=poisson)

    def round_length(self) -> int | None:
        """Batches in every round, or ``None`` when it varies with the sampled clients."""
        steps = {c.steps_per_round for c in self.clients.values()}
        every_client = clients_per_round(len(self.clients), self.client_fraction) == len(self.clients)
        if self.privacy.enabled and self.privacy.max_epsilon is not None:
            return None  # clients over budget sit out
        if self.client_sampling == "poisson":
            return None  # a random number of clients each round
        if every_client or len(steps) == 1:
            return self._rank_round_length(self._full_plan(0))
        return None

    def round_batches(self) -> Iterator[Any]:
        """This process's batches of the current round, client after client, then empty padding batches
        up to the length all processes share (starts the round when first advanced)."""
        self._start_round()
        if self.vectorized:
            yield from [_WHOLE_ROUND] * self._round_total
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
        self._round_schedule = self._schedule_state()
        # under DP only parameters leave a client: buffers keep their global values
        private = self.privacy.enabled or self.user_level is not None
        params = {name for name, _ in self.lightning_module.named_parameters()} if private else None
        if self.secure_aggregation.enabled:  # masks are set up among the round's clients before they train
            clients = self._local_plan.clients
            self._check_secure_capacity(len(clients))
            seed = self._sampling_seed + self.round_index  # the neighbour graph is public
            self._average = SecureSum(clients, self._global_state, params, self.secure_aggregation, seed)
        else:
            self._average = RunningAverage(only=params)
        return self._plan

    def _check_secure_capacity(self, count: int) -> None:
        """Refuses, before the round's clients train, a modulus their contributions could overflow, from public
        bounds: the clip under user-level DP (each clipped update's coordinates), else the largest record count
        times the global model's largest weight with :data:`WEIGHT_HEADROOM`."""
        config = self.secure_aggregation
        if self.user_level is not None:
            largest, bound = self.user_level.clip, "the user-level clip"
        else:
            examples = max(c.num_examples for c in self.clients.values())
            weight = max(float(self._global_state[n].abs().max()) for n, _ in self.lightning_module.named_parameters())
            largest = examples * max(1.0, weight) * WEIGHT_HEADROOM
            bound = f"{examples} records times {WEIGHT_HEADROOM:g} x the global model's largest weight"
        check_capacity(largest, bits=config.bits, scale=config.scale, clients=max(1, count), bound=bound)

    def _end_empty_round(self) -> None:
        """A round no client took part in (Poisson client sampling): under user-level DP the server still releases
        a noised (empty) sum and accounts the round, whatever the engine; otherwise the model stays as it is."""
        if self.user_level is not None:
            self._end_round()
        else:
            self.rounds_run += 1
            self._plan = None

    def _within_budget(self, plan: RoundPlan) -> RoundPlan:
        """Leaves out the clients whose epsilon would pass ``privacy.max_epsilon`` in this round."""
        budget = self.privacy.max_epsilon
        if not self.privacy.enabled or budget is None:
            return plan
        over = {}
        for name, steps in plan.segments:
            eps = self.clients[name].epsilon_after(steps, self.privacy.delta)
            if eps > budget:
                over[name] = eps
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
        self._padding = batch_idx >= self._local_plan.num_batches
        name = self._local_plan.starts.get(batch_idx)
        if name is not None:
            self._begin_client(self.clients[name])
        elif self._client is not None and not self._client_failed and self.client_time_limit is not None:
            elapsed = time.monotonic() - self._client_started
            if elapsed > self.client_time_limit:
                reason = f"it ran past the time limit of {self.client_time_limit:g} s ({elapsed:.1f} s)"
                if self.on_client_failure == "raise":
                    raise ConfigError(
                        f"client.time_limit_s={self.client_time_limit:g}: a client {reason[3:]} (client.on_failure="
                        "raise; with drop the run goes on without it for this round)"
                    )
                self._fail_client(reason)
        # a dropped client's remaining batches are skipped: no update, no noise, no accounting
        self._padding = self._padding or self._client_failed
        self._empty_batch = extract_batch_size(batch) == 0 or self._client_failed

    def _schedule_state(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The optimizer's hyperparameters (learning rate, momentum...) and every LR scheduler's state."""
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizers[0].param_groups]
        schedulers = [
            copy.deepcopy(c.scheduler.state_dict()) for c in self.lightning_module.trainer.lr_scheduler_configs
        ]
        return groups, schedulers

    def _begin_client(self, client: ClientState) -> None:
        self.lightning_module.load_state_dict(self._global_state)
        optimizer = self.optimizers[0]
        optimizer.state.clear()  # a client starts a round with a fresh optimizer, as in FedAvg
        # ... and at the round's point of the LR schedule: per-step schedulers would otherwise run on across the
        # round's clients in sequence (the schedule continues from where the round's last client leaves it)
        groups, schedulers = self._round_schedule
        for group, saved in zip(optimizer.param_groups, groups):
            group.update(saved)
        for config, saved in zip(self.lightning_module.trainer.lr_scheduler_configs, schedulers):
            config.scheduler.load_state_dict(copy.deepcopy(saved))  # the scheduler adopts the dict's objects
        if self._dp_optimizer is not None:
            self._dp_optimizer.noise_multiplier = client.noise_multiplier
            self._dp_optimizer.max_grad_norm = client.max_grad_norm
            self._dp_optimizer.expected_batch_size = client.batch_size
            self._dp_optimizer.generator = client.noise_rng
            account = client.accountant.get_optimizer_hook_fn(sample_rate=client.sample_rate)

            def after_noise(optimizer: DPOptimizer) -> None:  # after clipping and noise, before the update
                account(optimizer)
                self._add_proximal_gradient()

            self._dp_optimizer.attach_step_hook(after_noise)
        self._client = client
        self._client_failed = False
        self._client_started = time.monotonic()
        self._metric_sums = {}
        self._metric_steps = 0

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.vectorized:
            self._train_vectorized()
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
            if self.on_client_failure == "raise" or self._client is None:
                raise
            # the message of an error raised on a client's records may quote them: under DP only its type leaves
            released = self.releases_client_outputs
            self._fail_client(
                f"{type(err).__name__}" + (f": {err}" if released else " (message withheld: it may quote private data)")
            )
            # this step becomes an empty DP step: noise added and accounted (conservative), the weights discarded
            self._empty_batch = True
            return torch.zeros((), device=self.root_device, requires_grad=True)
        if self.releases_client_outputs:
            self._record_metrics(output)
        return output

    def _train_vectorized(self) -> None:
        clients = [self.clients[name] for name, _ in self._local_plan.segments]
        release = self.releases_client_outputs
        for update in self._vectorized_clients.train(clients, self.proximal_mu):
            if update.failure is not None:  # a datasite that denied, failed or timed out
                if self.on_client_failure == "raise":
                    raise ConfigError(
                        f"client {update.client.name!r}: {update.failure} (client.on_failure=raise; with drop the "
                        "run goes on without it for this round)"
                    )
                self._fail_client(update.failure, update.client)
                self.last_round.append(self._dropped_report(update.client))
                continue
            self._add_client(update.client, {**self._global_state, **update.params}, update.metrics if release else {})

    def _record_metrics(self, output: Any) -> None:
        scalars = {"loss": output} if isinstance(output, Tensor) else output if isinstance(output, dict) else {}
        for key, value in scalars.items():
            if isinstance(value, Tensor) and value.numel() == 1:
                value = value.detach().float().reshape(())
                self._metric_sums[key] = self._metric_sums[key] + value if key in self._metric_sums else value
        self._metric_steps += 1

    @override
    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        if self._empty_batch and self._dp_optimizer is not None:
            # zero per-sample gradients of an empty batch: clipping sums nothing, noise is still added
            for p in self._dp_optimizer.params:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            return closure_loss
        loss = super().backward(closure_loss, optimizer, *args, **kwargs)
        if self._dp_optimizer is not None:
            for p in self._dp_optimizer.params:
                if isinstance(p.grad_sample, Tensor) and p.grad_sample.dtype in (torch.float16, torch.bfloat16):
                    p.grad_sample = p.grad_sample.float()  # clipping norms in float32 under mixed precision
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
            if self._dp_optimizer is None and self.proximal_mu:
                closure = _followed_by(closure, self._add_proximal_gradient)  # under DP: in the step hook
            output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self._dp_optimizer is not None:
            self._dp_optimizer.zero_grad(set_to_none=True)  # per-example gradients reach neither memory nor checkpoints
        if not self._padding and self._client is not None:
            self._client.steps_taken += 1
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

    def _fail_client(self, reason: str, client: ClientState | None = None) -> None:
        """Drops ``client`` (by default the current one) from this round; the privacy it spent stays counted."""
        client = client or self._client
        self._client_failed = True
        round_no = self.round_index + 1
        self.faults.append({"round": round_no, "client": client.name, "reason": reason})
        who = "a client" if self.participation_withheld else f"client {client.name!r}"
        rank_zero_info(
            f"round {round_no}: {who} is dropped from this round ({reason}); the round averages the others, and "
            "the privacy it spent so far stays counted"
        )

    def _dropped_report(self, client: ClientState) -> ClientReport:
        return ClientReport(client.name, client.num_examples, self.epsilon_of(client), dropped=True)

    def _end_client(self) -> None:
        client = self._client
        if self._client_failed:
            self.last_round.append(self._dropped_report(client))
            self._client = None
            return
        steps = self._metric_steps
        metrics = {k: float(v) / steps for k, v in self._metric_sums.items()} if steps else {}
        self._add_client(client, self.lightning_module.state_dict(), metrics)
        self._client = None

    def _add_client(self, client: ClientState, state: Mapping[str, Tensor], metrics: dict[str, float]) -> None:
        """Adds a client's weights to the round's FedAvg and its report to the round's reports."""
        # the client's released (noised) weights: checking them is post-processing, it costs no privacy
        if not all(torch.isfinite(state[name]).all() for name, _ in self.lightning_module.named_parameters()):
            raise ConfigError(
                f"client {client.name!r} ended round {self.round_index + 1} with "
                "non-finite weights (the training diverged): lower the learning rate (model.lr) or check the data"
            )
        self.updates_added += 1
        if self.user_level is None:
            self._average.add(state, weight=client.num_examples, client=client.name)
        else:  # user-level DP: the client's update, clipped, counts once whatever its size
            update = {k: state[k] - self._global_state[k] for k in self._average.only}
            self._average.add(self.user_level.clipped(update), weight=1.0, client=client.name)
        self.last_round.append(ClientReport(client.name, client.num_examples, self.epsilon_of(client), metrics))

    def _end_round(self) -> None:
        self.rounds_trained += 1
        self.rounds_run += 1
        self._combine_round()
        if self.user_level is not None:
            average = self._user_level_average()
        elif self._average.total_weight == 0:
            rank_zero_info("no client finished this round: the global model stays as it is")
            self.lightning_module.load_state_dict(self._global_state)
            self._plan, self._global_state = None, {}
            return
        else:
            average = self._average.result(self._global_state)
        keys = averaged_keys(self._global_state, self._average.only)
        stepped, self.server_state = apply_server_optimizer(
            self.server, self._global_state, {k: average[k] for k in keys}, self.server_state
        )
        self.lightning_module.load_state_dict({**average, **stepped})
        self._plan = None
        self._global_state = {}

    def _user_level_average(self) -> dict[str, Tensor]:
        """The global model plus the round's noised mean of clipped updates (noise even when nobody took part)."""
        template = self._global_state
        summed = {
            k: self._average.summed.get(k, torch.zeros_like(template[k], dtype=torch.float64))
            for k in self._average.only
        }
        mean = self.user_level.release(summed)
        return {**template, **{k: (template[k].double() + mean[k]).to(template[k].dtype) for k in mean}}

    def evaluate_clients(self) -> dict[str, dict[str, float]]:
        """The global model's metrics on each client's held-out records (``client.holdout_fraction``), from the
        module's ``validation_step``; computed only where they may be released (no DP, or
        ``privacy.unsafe_release_training_metrics``): they come from private records without noise."""
        if not self.holdouts or not self.releases_client_outputs:
            return {}
        batch = self._holdout_batch_size
        return {
            name: evaluate_on(self.lightning_module, dataset, batch_size=batch, to_device=self.batch_to_device)
            for name, dataset in self.holdouts.items()
        }

    @property
    def current_client(self) -> str | None:
        """The client whose batches are training now (``None`` between rounds, and where participation is
        withheld)."""
        return None if self._client is None or self.participation_withheld else self._client.name

    @property
    def guaranteed(self) -> bool:
        """Whether the epsilons reported are proven upper bounds for what this run does."""
        return self.privacy.enabled and not self.privacy.weakened_by()

    @property
    def releases_client_outputs(self) -> bool:
        """Whether values computed from client records without noise (training metrics, training-stage
        ``self.log``, held-out metrics, error messages) may leave a client: only with no DP at all (record- or
        user-level), or under ``privacy.unsafe_release_training_metrics``."""
        if self.privacy.unsafe_release_training_metrics:
            return True
        return not self.privacy.enabled and not self.user_privacy.enabled

    @property
    def participation_withheld(self) -> bool:
        """Whether who took part in each round is kept from loggers and reports: under user-level DP with sampled
        clients (unless ``user_privacy.release_participation``), where the user-level epsilon relies on it."""
        return self.user_level is not None and self.user_level.participation_secret

    def epsilon_of(self, client: ClientState) -> float | None:
        """A client's released epsilon at ``privacy.delta``: its accountant's, or, where participation is withheld,
        the bound for a client that took part in every round so far (its own would show its rounds); ``None``
        without privacy or where none is proven (shuffled batches). GDP's value is an approximation."""
        if not self.privacy.enabled or not self.privacy.poisson_sampling:
            return None
        if self.participation_withheld:
            return client.epsilon_if_every_round(self.rounds_run, self.privacy.delta)
        return client.epsilon(self.privacy.delta)

    def epsilons(self) -> dict[str, float | None]:
        """Every client's privacy spent so far at ``privacy.delta`` (see :meth:`epsilon_of`)."""
        return {name: self.epsilon_of(c) for name, c in self.clients.items()}

    @override
    def teardown(self) -> None:
        if self._grad_sample_module is not None:
            self._grad_sample_module._close()  # removes Opacus's hooks: the user's module comes back clean
            self._grad_sample_module = None
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = []
        for param in self._relaid:
            param.data = param.data.contiguous()
        self._relaid = []
        if self.lightning_module is not None:
            self.lightning_module.__dict__.pop("log", None)
        if isinstance(self._vectorized_clients, SyftClients):
            self._vectorized_clients.close()
            self._vectorized_clients = None
        super().teardown()


def _no_log(*args: Any, **kwargs: Any) -> None:
    pass


def _followed_by(closure: Any, after: Any) -> Any:
    """``closure``, then ``after()``; returns the closure's result."""

    def run() -> Any:
        result = closure()
        after()
        return result

    return run


class SingleDeviceRounds(FederatedRounds):
    """The rounds on one device: the accelerator's first, unless ``device`` is given. Placed before a Lightning
    ``SingleDeviceStrategy`` of either namespace (``lightning.pytorch`` or ``pytorch_lightning``)."""

    def __init__(self, *, device: _DEVICE | None = None, **kwargs: Any):
        super().__init__(device=device if device is not None else "cpu", **kwargs)
        self._device_given = device is not None

    @property
    def root_device(self) -> torch.device:
        # by class name: the accelerator may come from either Lightning namespace
        if not self._device_given and type(self.accelerator).__name__ == "CUDAAccelerator":
            return torch.device("cuda", torch.cuda.current_device())
        return self._root_device


class FederatedDPStrategy(SingleDeviceRounds, SingleDeviceStrategy):
    """Federated averaging over named clients, each training with DP-SGD (Opacus) on its own data.

    Use with :class:`~fl_dp_lightning.FederatedDataModule` (or any ``train_dataloader`` that returns
    :class:`~fl_dp_lightning.data.ClientDatasets`); the LightningModule needs no change. For projects written
    against the standalone ``pytorch_lightning`` package, use ``fl_dp_lightning.pytorch_lightning.FederatedDPStrategy``.

    Args:
        privacy: DP-SGD settings; ``PrivacyConfig(enabled=False)`` trains plain federated averaging.
        server: the server optimizer applied to the clients' average (``ServerConfig()``: plain FedAvg).
        engine: how clients compute their steps: ``"opacus"`` (any module, its ``training_step``, one client
            after another) or ``"vectorized"`` (the round's clients at once; see
            :class:`~fl_dp_lightning.config.EngineConfig`).
        local_epochs: passes each client makes over its own data per round.
        client_fraction: fraction of clients sampled to train in each round, in (0, 1] (under Poisson client
            sampling, each client's probability of taking part).
        client_sampling: ``uniform`` (a fixed number of clients per round) or ``poisson`` (each independently).
        on_client_failure: ``drop`` (a client that raises, or runs past ``client_time_limit``, leaves the round,
            which averages the others) or ``raise`` (the run fails).
        client_time_limit: seconds a client's round may take, or ``None``.
        client_overrides: per-client batch size, local epochs, noise multiplier and clip norm, by client name.
        proximal_mu: FedProx's mu: each client's objective adds ``mu / 2 * ||w - w_global||^2`` (0: FedAvg).
        seed: seed of the client sampling per round (and of batch sampling and noise only under
            ``privacy.unsafe_seeded_randomness``).
        device: the device to train on; by default the accelerator's first device.
        log_rounds: add a :class:`~fl_dp_lightning.callbacks.FederatedLogger` when the Trainer has none.
    """

    strategy_name = "federated_dp"


_WHOLE_ROUND = "whole round"
"""The one batch of a vectorized round (the engine draws the clients' batches itself)."""


class _RoundIterable:
    """What Lightning iterates as the training loader: one round's batches per ``iter``."""

    def __init__(self, strategy: FederatedRounds):
        self.strategy = strategy

    def __len__(self) -> int:
        length = self.strategy.round_length()
        if length is None:
            raise TypeError("rounds differ in length when sampled clients differ in size")
        return length

    def __iter__(self) -> Iterator[Any]:
        return self.strategy.round_batches()
