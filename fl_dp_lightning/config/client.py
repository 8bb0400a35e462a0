"""How clients train: ``client=`` (batches, local epochs, sampling, failures, overrides, PySyft datasites)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from fl_dp_lightning.config.choices import (
    CLIENT_FAILURES,
    CLIENT_RUNTIMES,
    CLIENT_SAMPLINGS,
    MIN_NOISE_MULTIPLIER,
    PARTITIONS,
    SYFT_APPROVALS,
)
from fl_dp_lightning.config.errors import require


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


def rounds_per_epoch(fraction: float) -> int | None:
    """The rounds of an epoch under ``client.sampling=epoch``: ``1 / fraction`` when it is a whole number (to
    within 0.1 %), else ``None``."""
    rounds = round(1 / fraction)
    return rounds if rounds >= 1 and abs(rounds * fraction - 1) <= 1e-3 else None


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
    """``uniform`` (a fixed number per round, without replacement), ``poisson`` (each client independently,
    so a round can have no client: it is skipped and logged) or ``epoch`` (DP-FTRL's schedule: rounds come in
    epochs of ``1 / fraction`` rounds and each client takes part in one round of each epoch, drawn for it alone)."""
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
            self.sampling != "epoch" or rounds_per_epoch(self.fraction) is not None,
            "client.fraction",
            self.fraction,
            "with client.sampling=epoch it must be 1 / (rounds per epoch), e.g. 0.1 for epochs of 10 rounds",
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
