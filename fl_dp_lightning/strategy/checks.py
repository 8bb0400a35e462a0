"""Refusals before any training and before any privacy is spent, as pure functions (one line each, with the fix).

Rules about a single config group live in :mod:`fl_dp_lightning.config`; these are the rules that span the
strategy's options, the Trainer, or the clients' data.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from fl_dp_lightning.config import (
    CLIENT_FAILURES,
    CLIENT_SAMPLINGS,
    ClientOverride,
    ConfigError,
    PrivacyConfig,
    SecureAggregationConfig,
    UserPrivacyConfig,
)
from fl_dp_lightning.config.client import rounds_per_epoch
from fl_dp_lightning.privacy.accountants import epsilon_of_history
from fl_dp_lightning.runtime.client import ClientState
from fl_dp_lightning.server.user_level import UserLevelDP


def check_options(
    *,
    privacy: PrivacyConfig,
    user_privacy: UserPrivacyConfig,
    vectorized: bool,
    local_epochs: int,
    client_fraction: float,
    client_sampling: str,
    on_client_failure: str,
    client_time_limit: float | None,
    proximal_mu: float,
    client_overrides: Mapping[str, ClientOverride],
) -> None:
    """The strategy's own options, alone and together."""
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
    if client_sampling == "epoch" and rounds_per_epoch(client_fraction) is None:
        raise ConfigError(
            f"client_fraction={client_fraction} with client_sampling='epoch': must be 1 / (rounds per epoch), "
            "e.g. 0.1 for epochs of 10 rounds"
        )
    ftrl = user_privacy.enabled and user_privacy.mechanism == "dp_ftrl"
    if ftrl and client_sampling != "epoch" and client_fraction < 1:  # all clients every round: epochs of one
        raise ConfigError(
            f"client_sampling={client_sampling!r} with user_privacy.mechanism=dp_ftrl: its accounting needs each "
            "client in at most one round of each tree; set client.sampling=epoch (or client.fraction=1)"
        )
    if user_privacy.enabled and not ftrl and client_sampling != "poisson" and client_fraction < 1:
        raise ConfigError(
            f"client_fraction={client_fraction} with {client_sampling} client sampling: DP-FedAvg is accounted for "
            "Poisson client sampling; set client.sampling=poisson (or every client in every round), or "
            "user_privacy.mechanism=dp_ftrl with client.sampling=epoch"
        )
    if vectorized and client_time_limit is not None:
        raise ConfigError(
            f"client_time_limit={client_time_limit}: engine=vectorized trains a chunk of clients as one "
            "computation, so one client cannot be timed out; drop the limit or use engine=opacus"
        )
    if privacy.target_epsilon is not None and any(o.noise_multiplier for o in client_overrides.values()):
        raise ConfigError(
            "client.overrides.*.noise_multiplier: privacy.target_epsilon calibrates every client's noise; "
            "drop the noise override or the target"
        )


def check_settings(strategy: type, federated: Callable[..., Any], given: Iterable[str]) -> None:
    """Refuses a keyword that neither ``federated`` (the rounds' ``__init__``) nor the Lightning strategy under
    ``strategy`` take, naming the closest setting (a typo would otherwise reach Lightning's ``__init__``, or be
    ignored by ``DDPStrategy``, whose ``**kwargs`` go to a DistributedDataParallel these rounds never build)."""
    lightning = next(c for c in strategy.__mro__ if c.__module__.startswith(("lightning.", "pytorch_lightning.")))
    known = [*named_parameters(federated), *named_parameters(lightning.__init__)]
    for name in given:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"{strategy.__name__} got an unknown setting {name!r}: {hint}its settings are {', '.join(known)}"
            )


def named_parameters(function: Callable[..., Any]) -> list[str]:
    """The parameters ``function`` takes by name, ``self`` and ``**kwargs`` left out."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(function).parameters.values()
    return [p.name for p in params if p.kind in named and p.name != "self"]


def check_syft(*, vectorized: bool, secure_aggregation: SecureAggregationConfig, holdouts: bool = False) -> None:
    """What clients in PySyft datasites cannot run."""
    if not vectorized:
        raise ConfigError(
            "client.runtime=syft runs the vectorized engine's client round inside each datasite: add "
            "engine=vectorized (FederatedDPStrategy(engine='vectorized', syft=...))"
        )
    if secure_aggregation.enabled:
        raise ConfigError(
            "secure_aggregation.enabled with client.runtime=syft: the masks would have to be added inside the "
            "datasites, which is not built yet; use secure_aggregation=none or client.runtime=local"
        )
    if holdouts:
        raise ConfigError(
            "client.holdout_fraction with client.runtime=syft: the held-out records would have to be evaluated "
            "inside each datasite, which is not built yet; set client.holdout_fraction=0"
        )


def check_trainer(trainer: Any, automatic_optimization: bool, privacy: PrivacyConfig) -> None:
    """Trainer settings that would break a round or the privacy accounting (as Lightning's own
    ``configuration_validator``)."""
    problems = []
    if not automatic_optimization:
        problems.append(
            "manual optimization is not supported: the strategy must own each optimizer step to clip, "
            "noise and account it; use automatic optimization (self.automatic_optimization = True)"
        )
    if trainer.accumulate_grad_batches != 1:
        problems.append(
            f"accumulate_grad_batches={trainer.accumulate_grad_batches}: every step is accounted as one "
            "DP step; raise the batch size instead"
        )
    if privacy.enabled and trainer.gradient_clip_val:
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
    if privacy.enabled and precision in ("16-true", "bf16-true"):
        problems.append(
            f"precision={precision!r}: DP-SGD clips per-example gradients, whose norms need float32; "
            "use precision='bf16-mixed' (or '16-mixed', 32)"
        )
    if problems:
        raise ConfigError("FederatedDPStrategy cannot train with these settings: " + "; ".join(problems))


def check_user_delta(user_privacy: UserPrivacyConfig, clients: int) -> None:
    """A user-level delta of at least 1 / clients permits releasing one client's data outright."""
    if user_privacy.delta >= 1 / clients:
        raise ConfigError(
            f"user_privacy.delta={user_privacy.delta:g} is not below 1 / clients = 1/{clients}: a delta that "
            f"large permits releasing one client's data outright; set user_privacy.delta well below "
            f"{1 / clients:.2g} (e.g. 1e-5)"
        )


def check_finite_epsilon(
    privacy: PrivacyConfig,
    clients: Sequence[ClientState],
    user_level: UserLevelDP | None,
    user_privacy: UserPrivacyConfig,
    rounds: int,
) -> None:
    """A delta at which the accountant cannot give a finite epsilon for the planned rounds (a run would print
    epsilon = inf as its guarantee)."""
    if privacy.enabled and privacy.poisson_sampling and privacy.accountant != "gdp":
        # epsilon grows with the sample rate and steps and falls with the noise: one bound for every client
        worst_setting = (
            min(c.noise_multiplier for c in clients),
            max(c.sample_rate for c in clients),
            rounds * max(c.steps_per_round for c in clients),
        )
        worst = epsilon_of_history(type(clients[0].accountant), [worst_setting], privacy.delta)
        for client in clients if not math.isfinite(worst) else ():
            if not math.isfinite(client.epsilon_if_every_round(rounds, privacy.delta)):
                raise ConfigError(
                    f"privacy.delta={privacy.delta:g}: the {privacy.accountant} accountant gives "
                    f"epsilon = inf for client {client.name!r} over {rounds} rounds at this delta; raise "
                    "privacy.delta (e.g. 1e-5, below 1/n)"
                )
    if user_level is not None and not math.isfinite(user_level.epsilon_after(rounds)):
        raise ConfigError(
            f"user_privacy.delta={user_privacy.delta:g}: the {user_privacy.accountant} accountant gives "
            f"epsilon = inf over {rounds} rounds at this delta; raise user_privacy.delta (e.g. 1e-5, below "
            "1 / clients)"
        )
