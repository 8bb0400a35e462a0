"""Typed configuration: one dataclass per Hydra group, validated on construction.

The same dataclasses are the Python API (``FederatedDPStrategy(privacy=PrivacyConfig(...))``) and the
Hydra schema (registered in the ConfigStore by :func:`register_configs`), so a value is checked the same
way whichever door it comes through. Every error names the full config key and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DATA_SOURCES = ("mnist", "fashion_mnist", "synthetic")
DATA_FEATURES = ("pixels", "scatternet")
CLIENT_RUNTIMES = ("local", "syft")
SYFT_APPROVALS = ("auto", "manual")
PARTITIONS = ("iid", "dirichlet", "shards", "quantity")
CLIENT_SAMPLINGS = ("uniform", "poisson")
CLIENT_FAILURES = ("drop", "raise")
ACCOUNTANTS = ("pld", "rdp", "gdp")
RDP_CONVERSIONS = ("improved", "classic")
LOSS_REDUCTIONS = ("mean", "sum")
ACCELERATORS = ("cpu", "gpu")
NORM_FIXES = ("auto", "groupnorm", "layernorm", "identity")
MIN_NOISE_MULTIPLIER = 0.1
"""Smallest noise multiplier accepted under DP: below it epsilon runs into the hundreds and the PLD accountant's
grid grows past what it can compute."""
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi")
ENGINES = ("opacus", "vectorized")
USER_ACCOUNTANTS = ("pld", "rdp", "prv")
ENGINE_LOSSES = ("cross_entropy", "nll", "mse", "bce_with_logits")
PER_EXAMPLE = ("auto", "layers", "vmap")
MEMORY_FORMATS = ("auto", "channels_last", "preserve")


class ConfigError(ValueError):
    """A refused input: a config value, a data set, a module, a Trainer setting or a checkpoint.

    The message is one line that names the key (or file) and the fix; ``train.py`` prints it and exits with 2.
    """


def require(ok: bool, key: str, value: Any, rule: str) -> None:
    """Raises :class:`ConfigError` ``"<key>=<value>: <rule>"`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: {rule}")


@dataclass
class DataConfig:
    """Which data set to train on and where it lives."""

    name: str = "mnist"
    """Data source: ``mnist``, ``fashion_mnist`` or ``synthetic``."""
    root: str = "data"
    """Directory for downloaded data sets (created on demand)."""
    eval_batch_size: int = 1024
    """Examples per validation/test batch (no privacy cost: evaluation sees only the shared test set)."""
    synthetic_train_size: int = 2000
    """Training examples of the ``synthetic`` source."""
    synthetic_test_size: int = 500
    """Test examples of the ``synthetic`` source."""
    features: str = "pixels"
    """What the model reads: ``pixels`` (the images) or ``scatternet`` (ScatterNet features: a fixed scattering
    transform of each image alone, 81x7x7 per 28x28 image, computed once when the data loads; needs kymatio;
    ``model=scatternet`` sets it)."""

    def __post_init__(self) -> None:
        require(
            self.name in DATA_SOURCES,
            "data.name",
            self.name,
            f"unknown data set; choose one of {DATA_SOURCES}",
        )
        require(
            self.features in DATA_FEATURES,
            "data.features",
            self.features,
            f"unknown features; choose one of {DATA_FEATURES}",
        )
        require(self.eval_batch_size >= 1, "data.eval_batch_size", self.eval_batch_size, "must be >= 1")
        require(
            self.synthetic_train_size >= 1,
            "data.synthetic_train_size",
            self.synthetic_train_size,
            "must be >= 1",
        )
        require(
            self.synthetic_test_size >= 1,
            "data.synthetic_test_size",
            self.synthetic_test_size,
            "must be >= 1",
        )


@dataclass
class ClientOverride:
    """One client's own settings (``client.overrides.<name>.<key>``); a key left null takes the run's value."""

    batch_size: int | None = None
    """Expected examples per batch of this client (its sample rate is batch_size / its size)."""
    local_epochs: int | None = None
    """Expected passes over its data per round."""
    noise_multiplier: float | None = None
    """Its noise std / clip norm (unitless); not with ``privacy.target_epsilon``, which calibrates it."""
    max_grad_norm: float | None = None
    """Its per-example clip bound (gradient units)."""

    def __post_init__(self) -> None:
        for key in ("batch_size", "local_epochs"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"client.overrides.*.{key}", value, "must be >= 1 (or null)")
        require(
            self.noise_multiplier is None or MIN_NOISE_MULTIPLIER <= self.noise_multiplier < math.inf,
            "client.overrides.*.noise_multiplier",
            self.noise_multiplier,
            f"must be >= {MIN_NOISE_MULTIPLIER} and finite (or null)",
        )
        require(
            self.max_grad_norm is None or 0 < self.max_grad_norm < math.inf,
            "client.overrides.*.max_grad_norm",
            self.max_grad_norm,
            "must be > 0 and finite (or null)",
        )


def client_override(name: str, value: Any) -> ClientOverride:
    """``value`` (a mapping from Hydra, or a :class:`ClientOverride`) as a checked :class:`ClientOverride`."""
    if isinstance(value, ClientOverride):
        return value
    keys = [f.name for f in fields(ClientOverride)]
    unknown = sorted(set(value) - set(keys))
    require(not unknown, f"client.overrides.{name}", unknown, f"unknown key; the keys are {keys}")
    return ClientOverride(**value)


@dataclass
class SyftConfig:
    """Clients as PySyft datasites (``client.runtime=syft``): each client's records stay in its own datasite, which
    runs each round's DP training as code its owner approved. Needs ``fl_dp_lightning[syft]`` in its own
    environment (``make syft-test`` builds ``.venv-syft``)."""

    port: int | None = None
    """First loopback port: client ``i``'s datasite serves HTTP on ``127.0.0.1:port + i`` in its own process;
    ``null``: the datasites run inside this process."""
    approval: str = "auto"
    """How each owner answers the training request: ``auto`` (approved at once: simulation) or ``manual`` (the
    run waits, up to ``timeout_s``, for the owner to approve or deny it in PySyft)."""
    approved_rounds: int | None = None
    """Rounds one approval covers, written into the code the owner approves; after them a new request goes to
    the owner. ``null``: the whole run."""
    timeout_s: float = 600.0
    """Seconds to wait for an owner's answer or for a datasite's round; past it the client is dropped from the
    round as ``client.on_failure`` says."""

    def __post_init__(self) -> None:
        require(self.approval in SYFT_APPROVALS, "client.syft.approval", self.approval, f"one of {SYFT_APPROVALS}")
        require(
            self.port is None or 1024 <= self.port <= 65000, "client.syft.port", self.port, "in [1024, 65000] or null"
        )
        require(
            self.approved_rounds is None or self.approved_rounds >= 1,
            "client.syft.approved_rounds",
            self.approved_rounds,
            "must be >= 1 (or null: the whole run)",
        )
        require(0 < self.timeout_s < math.inf, "client.syft.timeout_s", self.timeout_s, "must be > 0 and finite")


@dataclass
class ClientConfig:
    """The data holders: how many, what they are called, how the data is split and who joins a round."""

    count: int = 2
    """Number of clients."""
    names: list[str] = field(default_factory=lambda: ["alice", "bob"])
    """Names of the first clients; clients past the list are called ``client_<index>``."""
    partition: str = "iid"
    """How the training set is split: ``iid`` (equal random shares), ``dirichlet`` (label skew), ``shards``
    (McMahan et al.'s label shards: few classes per client) or ``quantity`` (IID labels, log-normal sizes)."""
    dirichlet_alpha: float = 0.5
    """Concentration of the ``dirichlet`` partition (smaller is more skewed); unitless, > 0."""
    shards_per_client: int = 2
    """Label shards each client gets under ``shards``, >= 1."""
    quantity_sigma: float = 1.0
    """Log-normal sigma of the client sizes under ``quantity`` (0: equal sizes); unitless, >= 0."""
    drop_small: bool = False
    """Leave out (and log) the clients a partition leaves with fewer records than the batch size; off, they are
    refused with the fix."""
    fraction: float = 1.0
    """Fraction of clients sampled to train in each round, in (0, 1]; under ``sampling=poisson`` each client's
    probability of taking part."""
    per_round: int | None = None
    """Clients per round, a count (replaces ``fraction`` for ``uniform`` sampling); ``null``: use ``fraction``."""
    sampling: str = "uniform"
    """``uniform`` (a fixed number per round, without replacement) or ``poisson`` (each client independently,
    so a round can have no client: it is skipped and logged)."""
    on_failure: str = "drop"
    """A client that raises during its round, or runs past ``time_limit_s``: ``drop`` it from that round (the
    others are averaged, its privacy spent stays counted, the event is logged and reported) or ``raise``."""
    time_limit_s: float | None = None
    """Seconds a client's round may take (checked between its steps); ``null``: no limit."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Per-client settings by name, e.g. ``+client.overrides.alice.batch_size=64``; each client's accountant
    uses its own settings, and the privacy report lists them."""
    holdout_fraction: float = 0.0
    """Fraction of each client's records kept out of training to evaluate the global model on that client's own
    data after each round (``holdout/<metric>/<client>``, from the module's ``validation_step``), in [0, 1). These
    metrics come from private records without noise: released only without DP or under
    ``privacy.unsafe_release_training_metrics``."""
    proximal_mu: float = 0.0
    """FedProx's mu (Li et al. 2020): each client's objective adds ``mu / 2 * ||w - w_global||^2``; 0 is FedAvg.
    Unitless, >= 0. Under DP its gradient joins the noised update, costing no privacy."""
    runtime: str = "local"
    """Where each client's round runs: ``local`` (in this process) or ``syft`` (in the client's own PySyft
    datasite, with ``engine=vectorized``'s client round; see ``client.syft``)."""
    syft: SyftConfig = field(default_factory=SyftConfig)
    """The datasites of ``runtime=syft``."""

    def __post_init__(self) -> None:
        require(self.count >= 1, "client.count", self.count, "need at least one client")
        require(self.partition in PARTITIONS, "client.partition", self.partition, f"choose one of {PARTITIONS}")
        require(
            0 < self.dirichlet_alpha < math.inf,
            "client.dirichlet_alpha",
            self.dirichlet_alpha,
            "must be > 0 and finite",
        )
        require(0 < self.fraction <= 1, "client.fraction", self.fraction, "must be in (0, 1]")
        require(self.on_failure in CLIENT_FAILURES, "client.on_failure", self.on_failure, f"one of {CLIENT_FAILURES}")
        require(
            self.time_limit_s is None or 0 < self.time_limit_s < math.inf,
            "client.time_limit_s",
            self.time_limit_s,
            "must be > 0 seconds and finite (or null)",
        )
        require(
            self.sampling in CLIENT_SAMPLINGS, "client.sampling", self.sampling, f"choose one of {CLIENT_SAMPLINGS}"
        )
        require(
            self.per_round is None or (1 <= self.per_round <= self.count and self.sampling == "uniform"),
            "client.per_round",
            self.per_round,
            f"must be in [1, client.count={self.count}] with client.sampling=uniform (or null)",
        )
        require(self.shards_per_client >= 1, "client.shards_per_client", self.shards_per_client, "must be >= 1")
        require(
            0 <= self.quantity_sigma < math.inf, "client.quantity_sigma", self.quantity_sigma, "must be >= 0 and finite"
        )
        require(0 <= self.proximal_mu < math.inf, "client.proximal_mu", self.proximal_mu, "must be >= 0 and finite")
        require(0 <= self.holdout_fraction < 1, "client.holdout_fraction", self.holdout_fraction, "must be in [0, 1)")
        require(self.runtime in CLIENT_RUNTIMES, "client.runtime", self.runtime, f"choose one of {CLIENT_RUNTIMES}")
        require(
            all(isinstance(n, str) and n.strip() and n == n.strip() for n in self.names),
            "client.names",
            self.names,
            "every name must be a non-empty string without surrounding spaces",
        )
        require(
            len(self.names) <= self.count,
            "client.names",
            self.names,
            f"{len(self.names)} names for client.count={self.count}; set client.count={len(self.names)} or drop names",
        )
        names = self.client_names()
        require(len(set(names)) == len(names), "client.names", self.names, "client names must be unique")
        self.overrides = {name: client_override(name, value) for name, value in self.overrides.items()}
        unknown = sorted(set(self.overrides) - set(names))
        require(not unknown, "client.overrides", unknown, f"no such client; the clients are {names}")

    def round_fraction(self) -> float:
        """The fraction the strategy samples with: ``per_round / count`` when a count is given."""
        return self.fraction if self.per_round is None else self.per_round / self.count

    def client_names(self) -> list[str]:
        """The ``count`` client names: ``names`` first, then ``client_<index>``."""
        given = list(self.names)[: self.count]
        return given + [f"client_{i}" for i in range(len(given), self.count)]


@dataclass
class PrivacyConfig:
    """Record-level DP-SGD run by every client on its own data (Opacus).

    The guarantee is record-level (epsilon, delta)-DP per client under replace-one adjacency (see the README's
    privacy section). The two ``unsafe_*`` keys weaken it and are named in every privacy report when on.
    """

    enabled: bool = True
    """False trains plain federated averaging (no clipping, no noise, no accounting), for comparison."""
    noise_multiplier: float = 1.2
    """Std of the Gaussian noise divided by ``max_grad_norm``; unitless, > 0 (for no noise use privacy=none)."""
    max_grad_norm: float = 1.0
    """Per-example gradient clipping bound (L2 norm, in gradient units); > 0, finite."""
    delta: float = 1e-5
    """Target delta of the (epsilon, delta) guarantee; probability, in (0, 1)."""
    accountant: str = "pld"
    """Privacy accountant, all under replace-one adjacency: ``pld`` (privacy loss distribution, tight),
    ``rdp`` (Renyi DP bound, looser) or ``gdp`` (central-limit approximation: no guarantee)."""
    rdp_conversion: str = "improved"
    """For ``accountant=rdp``, RDP to (epsilon, delta): ``improved`` (Opacus's default) or ``classic``."""
    target_epsilon: float | None = None
    """If set, each client's noise multiplier is calibrated before training so that its epsilon after all
    rounds lands at or just under this value (``noise_multiplier`` is then replaced, and the choice logged)."""
    max_epsilon: float | None = None
    """Budget: a client sits out any round that would carry its epsilon past this; the run ends when no
    client can train. ``null`` means no budget."""
    poisson_sampling: bool = True
    """Sample each batch by including every record independently. Off (shuffled fixed-size batches), no
    guarantee is proven and epsilon is reported as "not proven"."""
    loss_reduction: str = "mean"
    """How the module's loss reduces over the batch (``mean`` or ``sum``); must match ``training_step``."""
    fix_modules: bool = False
    """Replace layers DP-SGD cannot train, in place, before training (BatchNorm as ``fix_norm`` says, in-place
    activations turned off, Opacus's fixes for the rest); off, such layers are refused with this fix named."""
    fix_norm: str = "auto"
    """What replaces BatchNorm under ``fix_modules``: ``auto`` (GroupNorm(1, C) for BatchNorm1d, GroupNorm with up
    to 32 groups for 2-D/3-D), ``groupnorm``, ``layernorm`` (GroupNorm(1, C)) or ``identity``."""
    secure_mode: bool = False
    """Opacus's floating-point-attack-resistant noise sampling (4x the noise draws). Noise and sampling are
    secret without it too (seeded from OS entropy)."""
    unsafe_seeded_randomness: bool = False
    """UNSAFE, for research and tests: seed the noise and batch sampling from ``trainer.seed`` so runs repeat
    exactly. The guarantee then does not hold against anyone who knows the seed."""
    unsafe_release_training_metrics: bool = False
    """UNSAFE, for debugging: release what DP-SGD keeps inside a client (per-client training loss and metrics,
    the module's training-stage ``self.log`` and raw gradients after backward). None of it is covered."""
    unsafe_release_class_counts: bool = False
    """UNSAFE, for inspecting a partition: log how many records of each class every client holds (a table and a
    heat map, in the log, TensorBoard and the run folder). Exact counts of private labels: not covered. Without DP
    they are always logged."""

    def __post_init__(self) -> None:
        if self.accountant == "prv":
            raise ConfigError(
                "privacy.accountant='prv': Opacus's PRV accountant assumes add/remove adjacency, but each client's "
                "record count is public here (replace-one); use privacy.accountant=pld (as tight as PRV)"
            )
        require(
            self.accountant in ACCOUNTANTS,
            "privacy.accountant",
            self.accountant,
            f"choose one of {ACCOUNTANTS}",
        )
        require(
            self.rdp_conversion in RDP_CONVERSIONS,
            "privacy.rdp_conversion",
            self.rdp_conversion,
            f"choose one of {RDP_CONVERSIONS}",
        )
        require(
            self.rdp_conversion == "improved" or self.accountant == "rdp",
            "privacy.rdp_conversion",
            self.rdp_conversion,
            f"applies to privacy.accountant=rdp only, not {self.accountant!r}; set privacy.accountant=rdp or drop it",
        )
        require(
            self.loss_reduction in LOSS_REDUCTIONS,
            "privacy.loss_reduction",
            self.loss_reduction,
            f"choose one of {LOSS_REDUCTIONS}",
        )
        require(0 < self.delta < 1, "privacy.delta", self.delta, "must be in (0, 1), e.g. 1e-5")
        require(self.fix_norm in NORM_FIXES, "privacy.fix_norm", self.fix_norm, f"choose one of {NORM_FIXES}")
        require(
            0 < self.max_grad_norm < math.inf, "privacy.max_grad_norm", self.max_grad_norm, "must be > 0 and finite"
        )
        for key in ("target_epsilon", "max_epsilon"):
            value = getattr(self, key)
            require(value is None or 0 < value < math.inf, f"privacy.{key}", value, "must be > 0 and finite (or null)")
        if not self.enabled:
            return
        require(
            0 < self.noise_multiplier < math.inf,
            "privacy.noise_multiplier",
            self.noise_multiplier,
            "must be > 0 and finite: without noise there is no privacy (use privacy=none to train without DP)",
        )
        require(
            self.noise_multiplier >= MIN_NOISE_MULTIPLIER or self.target_epsilon is not None,
            "privacy.noise_multiplier",
            self.noise_multiplier,
            f"below {MIN_NOISE_MULTIPLIER} epsilon runs into the hundreds (DP protects nothing) and cannot be "
            "accounted; raise it, or use privacy=none to train without DP",
        )
        for key in ("target_epsilon", "max_epsilon"):
            require(
                getattr(self, key) is None or self.accountant != "gdp",
                f"privacy.{key}",
                getattr(self, key),
                "needs a guaranteed epsilon, and accountant=gdp is an approximation; use privacy.accountant=pld",
            )
            require(
                getattr(self, key) is None or self.poisson_sampling,
                f"privacy.{key}",
                getattr(self, key),
                "needs a proven epsilon, which shuffled batches do not have; set privacy.poisson_sampling=true",
            )
        require(
            not (self.secure_mode and self.unsafe_seeded_randomness),
            "privacy.secure_mode",
            self.secure_mode,
            "contradicts privacy.unsafe_seeded_randomness=true; turn one of them off",
        )

    @property
    def releases_client_outputs(self) -> bool:
        """Whether values computed from client records without noise (training metrics, held-out metrics, error
        messages) may leave a client: without DP, or under ``unsafe_release_training_metrics``."""
        return not self.enabled or self.unsafe_release_training_metrics

    def weakened_by(self) -> list[str]:
        """The settings in force that weaken the guarantee, each with what it costs."""
        if not self.enabled:
            return []
        reasons = []
        if self.unsafe_seeded_randomness:
            reasons.append(
                "privacy.unsafe_seeded_randomness: noise and sampling are a function of trainer.seed; "
                "no guarantee against anyone who knows the seed"
            )
        if self.unsafe_release_training_metrics:
            reasons.append(
                "privacy.unsafe_release_training_metrics: per-client training metrics, the module's training-stage "
                "self.log and raw gradients are released without noise and are not covered"
            )
        if self.unsafe_release_class_counts:
            reasons.append(
                "privacy.unsafe_release_class_counts: every client's exact count of records per class is released "
                "without noise and is not covered"
            )
        if not self.poisson_sampling:
            reasons.append("privacy.poisson_sampling=false: no guarantee is proven for shuffled fixed-size batches")
        if self.accountant == "gdp":
            reasons.append("privacy.accountant=gdp: a central-limit approximation, not an upper bound")
        return reasons


@dataclass
class ServerConfig:
    """How the server turns the clients' average into the next global model (see :mod:`fl_dp_lightning.server`)."""

    optimizer: str = "fedavg"
    """``fedavg``, ``fedavgm`` (server momentum), ``fedadagrad``, ``fedadam`` or ``fedyogi`` (Reddi et al. 2021)."""
    lr: float = 1.0
    """Server learning rate: the step along the average client delta (1 with ``fedavg`` is plain FedAvg)."""
    momentum: float = 0.9
    """``fedavgm``'s momentum, in [0, 1)."""
    beta1: float = 0.9
    """First-moment decay of the adaptive optimizers, in [0, 1)."""
    beta2: float = 0.99
    """Second-moment decay of ``fedadam`` and ``fedyogi``, in [0, 1)."""
    tau: float = 1e-3
    """Adaptivity floor of the adaptive optimizers (added to the root of the second moment), > 0."""

    def __post_init__(self) -> None:
        require(
            self.optimizer in SERVER_OPTIMIZERS,
            "server.optimizer",
            self.optimizer,
            f"choose one of {SERVER_OPTIMIZERS}",
        )
        require(0 < self.lr < math.inf, "server.lr", self.lr, "must be > 0 and finite")
        for key in ("momentum", "beta1", "beta2"):
            require(0 <= getattr(self, key) < 1, f"server.{key}", getattr(self, key), "must be in [0, 1)")
        require(0 < self.tau < math.inf, "server.tau", self.tau, "must be > 0 and finite")


@dataclass
class UserPrivacyConfig:
    """User-level DP at the server (DP-FedAvg): each client's whole contribution is protected (see
    :mod:`fl_dp_lightning.privacy.user_level`). Independent of the record-level ``privacy`` group; both can be on."""

    enabled: bool = False
    """Clip each client's update and add noise at the server."""
    noise_multiplier: float = 1.0
    """Server noise standard deviation / clip norm (unitless, > 0); with adaptive clipping, the total of the
    update and count noise (Andrew et al.'s split)."""
    clip: float = 1.0
    """L2 bound S on one client's update (its weights minus the global model's, parameter units); with adaptive
    clipping, its starting value."""
    delta: float = 1e-5
    """Delta of the user-level (epsilon, delta) guarantee; keep it well below 1 / number of clients."""
    accountant: str = "pld"
    """User-level accountant (add/remove one client): ``pld`` (dp-accounting), ``rdp`` or ``prv`` (Opacus)."""
    target_epsilon: float | None = None
    """Calibrate ``noise_multiplier`` so that all planned rounds spend this user-level epsilon."""
    adaptive_clipping: bool = False
    """Move the clip norm each round towards ``target_quantile`` of the update norms (Andrew et al. 2021)."""
    target_quantile: float = 0.5
    """Adaptive clipping: the quantile of update norms the clip tracks, in (0, 1)."""
    clip_learning_rate: float = 0.2
    """Adaptive clipping: step of the geometric clip update (unitless, > 0)."""
    release_participation: bool = False
    """Under Poisson client sampling, log which clients took part in each round (per-client round lines,
    epsilons and steps). The user-level epsilon is then accounted without amplification by client sampling (as if
    every client took part in every round), since participation is no longer secret."""
    count_noise: float | None = None
    """Adaptive clipping: standard deviation of the noise on the count of clients that fitted under the clip
    (clients); ``null``: the larger of expected clients per round / 20 (the paper's choice) and the noise
    multiplier, so that the count never takes more than a quarter of the noise budget."""

    def __post_init__(self) -> None:
        require(
            0 < self.noise_multiplier < math.inf,
            "user_privacy.noise_multiplier",
            self.noise_multiplier,
            "must be > 0 and finite",
        )
        require(0 < self.clip < math.inf, "user_privacy.clip", self.clip, "must be > 0 and finite")
        require(0 < self.delta < 1, "user_privacy.delta", self.delta, "must be in (0, 1), e.g. 1e-5")
        require(
            self.accountant in USER_ACCOUNTANTS,
            "user_privacy.accountant",
            self.accountant,
            f"choose one of {USER_ACCOUNTANTS}",
        )
        require(
            self.target_epsilon is None or 0 < self.target_epsilon < math.inf,
            "user_privacy.target_epsilon",
            self.target_epsilon,
            "must be > 0 and finite (or null)",
        )
        require(0 < self.target_quantile < 1, "user_privacy.target_quantile", self.target_quantile, "must be in (0, 1)")
        require(
            0 < self.clip_learning_rate < math.inf,
            "user_privacy.clip_learning_rate",
            self.clip_learning_rate,
            "must be > 0 and finite",
        )
        require(
            self.count_noise is None or 0 < self.count_noise < math.inf,
            "user_privacy.count_noise",
            self.count_noise,
            "must be > 0 and finite (or null)",
        )


@dataclass
class SecureAggregationConfig:
    """Secure aggregation, simulated (see :mod:`fl_dp_lightning.secure_aggregation`): the server sees only the sum."""

    enabled: bool = False
    """Mask each client's contribution so that only the round's sum can be decoded."""
    bits: int = 48
    """The modulus 2^bits of the fixed-point integers, in [16, 62]."""
    scale: float = 1048576.0
    """Fixed-point scale: values are rounded to multiples of 1 / scale (2^20 by default); the sum over the round's
    clients must stay below 2^(bits - 1) / scale, which is checked."""
    threshold: float = 2 / 3
    """Shares needed to recover a client's secrets, as a fraction of its neighbourhood (it and its neighbours),
    rounded up, in (0.5, 1]; a round in which fewer of a neighbourhood survive is refused. Above one half, a server
    that tells some survivors a client dropped and others that it survived cannot collect both of its secrets."""
    neighbors: int | None = None
    """Neighbours each client masks with (SecAgg+); ``null``: all the round's other clients."""

    def __post_init__(self) -> None:
        require(16 <= self.bits <= 62, "secure_aggregation.bits", self.bits, "must be in [16, 62]")
        require(0 < self.scale < math.inf, "secure_aggregation.scale", self.scale, "must be > 0 and finite")
        require(
            0.5 < self.threshold <= 1,
            "secure_aggregation.threshold",
            self.threshold,
            "must be in (0.5, 1]: with half of a neighbourhood or fewer, a server that tells some survivors a client "
            "dropped and others that it survived collects both of its secrets and reads its update (e.g. 2/3)",
        )
        require(
            self.neighbors is None or self.neighbors >= 2,
            "secure_aggregation.neighbors",
            self.neighbors,
            "must be >= 2 (or null: all)",
        )


@dataclass
class EngineConfig:
    """How each client computes its DP-SGD steps (see :mod:`fl_dp_lightning.vectorized`)."""

    name: str = "opacus"
    """``opacus``: any LightningModule, its own ``training_step``, client after client (Opacus's hooks; the
    fastest on a few CPU cores). ``vectorized``: the round's clients at once with ``torch.func`` over the module's
    ``forward`` and ``loss`` (SGD, tensor data; the module's ``training_step`` is not called)."""
    loss: str = "cross_entropy"
    """``vectorized``: the per-example loss of ``forward``'s output and the target: ``cross_entropy``, ``nll``,
    ``mse`` or ``bce_with_logits`` (batch-mean or batch-sum as ``privacy.loss_reduction`` says)."""
    clients_per_chunk: int | None = None
    """``vectorized``: clients trained at once; ``null``: as many as fit 2 GiB on a CPU, half the free memory on
    a GPU."""
    compile: bool = False
    """``vectorized``: compile each client's step with ``torch.compile`` over batches padded to one static width
    (once per process: tens of seconds on a CPU; falls back to eager, with a warning, where it fails)."""
    per_example: str = "auto"
    """``vectorized``, under DP: how each example's gradient is computed. ``layers``: one pass of the batch through
    the module's layers and Opacus's per-layer rules (in ``engine.memory_format``); ``vmap``: ``torch.func`` over the
    examples (and the clients, on a GPU). ``auto``: ``layers`` on CPU cores when every trained layer has a rule and
    runs once per forward (about twice as fast there: benchmarks/speed.py), else ``vmap``. Both give the same
    gradients."""
    memory_format: str = "auto"
    """Layout of 4-D parameters and inputs while clients train: ``channels_last`` (convolutions and pooling run
    about twice as fast in it on CPU cores: benchmarks/speed.py), ``preserve`` (as the module and data have them),
    or ``auto``: ``channels_last`` on CPU cores, ``preserve`` on a GPU. Values are unchanged either way."""

    def channels_last_on(self, device: Any) -> bool:
        """Whether clients training on ``device`` (a ``torch.device``) use the channels-last layout."""
        return self.memory_format == "channels_last" or (self.memory_format == "auto" and device.type == "cpu")

    def __post_init__(self) -> None:
        require(self.name in ENGINES, "engine.name", self.name, f"choose one of {ENGINES}")
        require(
            self.memory_format in MEMORY_FORMATS,
            "engine.memory_format",
            self.memory_format,
            f"choose one of {MEMORY_FORMATS}",
        )
        require(self.per_example in PER_EXAMPLE, "engine.per_example", self.per_example, f"choose one of {PER_EXAMPLE}")
        require(self.loss in ENGINE_LOSSES, "engine.loss", self.loss, f"choose one of {ENGINE_LOSSES}")
        require(
            self.clients_per_chunk is None or self.clients_per_chunk >= 1,
            "engine.clients_per_chunk",
            self.clients_per_chunk,
            "must be >= 1 (or null: sized to memory)",
        )


@dataclass
class HardwareConfig:
    """Where training runs."""

    accelerator: str = "cpu"
    """``cpu`` or ``gpu`` (CUDA)."""
    devices: int = 1
    """Processes per node (one device each); more than one process splits the clients among them."""
    num_nodes: int = 1
    """Nodes (machines); launched by torchrun or SLURM, which Lightning detects."""

    def __post_init__(self) -> None:
        require(self.num_nodes >= 1, "hardware.num_nodes", self.num_nodes, "must be >= 1")
        require(
            self.accelerator in ACCELERATORS,
            "hardware.accelerator",
            self.accelerator,
            f"choose {ACCELERATORS}",
        )
        require(self.devices >= 1, "hardware.devices", self.devices, "must be >= 1")


@dataclass
class TrainerConfig:
    """The federated schedule and the Lightning Trainer's settings."""

    rounds: int = 5
    """Federated rounds (one Lightning epoch each)."""
    local_epochs: int = 1
    """Passes over its own data that each client makes per round (expected, under Poisson sampling)."""
    batch_size: int = 128
    """Expected examples per client batch (sample rate = batch_size / client data size)."""
    seed: int = 0
    """Seed of model init, partition, sampling and noise."""
    progress_bar: bool = True
    """Show Lightning's progress bar."""
    log_every_n_steps: int = 10
    """How often (in optimizer steps) Lightning logs step metrics."""
    ckpt_path: str | None = None
    """Checkpoint to resume from (``null`` starts fresh)."""

    def __post_init__(self) -> None:
        require(self.rounds >= 1, "trainer.rounds", self.rounds, "must be >= 1")
        require(self.local_epochs >= 1, "trainer.local_epochs", self.local_epochs, "must be >= 1")
        require(self.batch_size >= 1, "trainer.batch_size", self.batch_size, "must be >= 1")
        require(self.log_every_n_steps >= 1, "trainer.log_every_n_steps", self.log_every_n_steps, "must be >= 1")
        require(0 <= self.seed < 2**32, "trainer.seed", self.seed, "must be in [0, 2**32)")
        if self.ckpt_path is not None:
            path = Path(self.ckpt_path)
            require(path.exists(), "trainer.ckpt_path", self.ckpt_path, "no such file; give the path of a .ckpt file")
            require(path.is_file(), "trainer.ckpt_path", self.ckpt_path, "is a folder; give the .ckpt file inside it")


@dataclass
class Config:
    """The whole run, as ``train.py`` composes it."""

    data: DataConfig = field(default_factory=DataConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    user_privacy: UserPrivacyConfig = field(default_factory=UserPrivacyConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: Any = field(default_factory=lambda: {"_target_": "fl_dp_lightning.models.LitClassifier"})
    """Hydra ``_target_`` spec of the LightningModule to train (any module; ``lr`` etc. as keys)."""


def register_configs() -> None:
    """Registers :class:`Config` as Hydra's ``schema`` so every override is type-checked."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=Config)
