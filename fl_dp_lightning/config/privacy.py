"""Record-level DP-SGD (``privacy=``) and user-level DP-FedAvg (``user_privacy=``) settings."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fl_dp_lightning.config.choices import (
    ACCOUNTANTS,
    LOSS_REDUCTIONS,
    MIN_NOISE_MULTIPLIER,
    NORM_FIXES,
    RDP_CONVERSIONS,
    USER_ACCOUNTANTS,
    USER_MECHANISMS,
)
from fl_dp_lightning.config.errors import ConfigError, require


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
class UserPrivacyConfig:
    """User-level DP at the server (DP-FedAvg): each client's whole contribution is protected (see
    :mod:`fl_dp_lightning.privacy.user_level`). Independent of the record-level ``privacy`` group; both can be on."""

    enabled: bool = False
    """Clip each client's update and add noise at the server."""
    mechanism: str = "dp_fedavg"
    """``dp_fedavg`` (fresh noise every round; accounted with amplification by Poisson client sampling) or
    ``dp_ftrl`` (tree-aggregated noise, restarted every epoch, with ``client.sampling=epoch``: needs no secret
    client sampling; Kairouz et al. 2021)."""
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
        require(
            self.mechanism in USER_MECHANISMS,
            "user_privacy.mechanism",
            self.mechanism,
            f"choose one of {USER_MECHANISMS}",
        )
        require(
            not (self.mechanism == "dp_ftrl" and self.adaptive_clipping),
            "user_privacy.adaptive_clipping",
            self.adaptive_clipping,
            "not accounted under user_privacy.mechanism=dp_ftrl (its count query would need noise of its own); "
            "set a fixed user_privacy.clip",
        )
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
