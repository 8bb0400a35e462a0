"""Checkpoints of a federated run: what they carry, and what a resume must match.

A checkpoint carries the settings that decide the privacy spent and every client's lasting state (accountant,
noise multiplier, steps; random streams only under the unsafe seeded opt-in), the server optimizer's moments and
the rounds trained. A resume is refused, naming each difference, when the settings, the clients, the data or the
model differ, and when a target-calibrated run would be carried past its target.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from typing_extensions import override

from fl_dp_lightning.checkpoint import CHECKPOINT_KEY
from fl_dp_lightning.config import ConfigError, SecureAggregationConfig, UserPrivacyConfig


class ResumableRounds:
    """The checkpoint hooks of :class:`~fl_dp_lightning.strategy.federated_dp.FederatedRounds` (a mixin placed
    before a Lightning strategy)."""

    def state_dict(self) -> dict[str, Any]:
        """The federated state a checkpoint carries: settings and every client's lasting state."""
        return {
            "privacy": asdict(self.privacy),
            "seed": self.seed,
            "local_epochs": self.local_epochs,
            "client_fraction": self.client_fraction,
            "client_sampling": self.client_sampling,
            "client_overrides": {name: asdict(o) for name, o in self.client_overrides.items()},
            "proximal_mu": self.proximal_mu,
            "server": asdict(self.server),
            "user_privacy": asdict(self.user_privacy),
            "secure_aggregation": asdict(self.secure_aggregation),
            "user_level": None if self.user_level is None else self.user_level.state_dict(),
            "server_state": self.server_state,
            "planned_rounds": self.planned_rounds,
            "rounds_trained": self.rounds_trained,
            "rounds_run": self.rounds_run,
            "faults": self.faults,
            "clients": {name: c.state_dict() for name, c in self.clients.items()},
        }

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if self._global_state:
            raise RuntimeError(
                "a checkpoint was requested in the middle of a round, where the model holds one client's "
                "weights: save between rounds (ModelCheckpoint(every_n_epochs=...), not every_n_train_steps)"
            )
        checkpoint[CHECKPOINT_KEY] = self.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            raise ConfigError(
                f"{checkpoint_path} was not written by FederatedDPStrategy: it carries no client privacy "
                "state, so resuming would forget the privacy already spent. Start a new run instead."
            )
        self._check_settings(state)
        self._restored = state
        if self.clients:
            self._load_clients(state)
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        ours = self.lightning_module.state_dict()
        theirs = checkpoint["state_dict"]
        missing = sorted(set(ours) - set(theirs))
        unexpected = sorted(set(theirs) - set(ours))
        reshaped = sorted(k for k in set(ours) & set(theirs) if ours[k].shape != theirs[k].shape)
        if strict and (missing or unexpected or reshaped):
            raise ConfigError(
                f"the checkpoint holds another model's weights (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                f"other shapes {reshaped[:3]}); resume with the model that wrote it, or start anew"
            )
        super().load_model_state_dict(checkpoint, strict=strict)

    def _check_settings(self, state: dict[str, Any]) -> None:
        current = self.state_dict()
        # checkpoints from before user-level DP and secure aggregation
        state.setdefault("user_privacy", asdict(UserPrivacyConfig()))
        state.setdefault("secure_aggregation", asdict(SecureAggregationConfig()))
        saved_privacy, privacy = state["privacy"], current["privacy"]
        diffs = [
            f"privacy.{key}: checkpoint {saved_privacy.get(key)!r}, now {privacy[key]!r}"
            for key in privacy
            if saved_privacy.get(key) != privacy[key]
        ]
        diffs += [
            f"{key}: checkpoint {state.get(key)!r}, now {current[key]!r}"
            for key in (
                "seed",
                "local_epochs",
                "client_fraction",
                "client_sampling",
                "client_overrides",
                "proximal_mu",
                "server",
                "user_privacy",
                "secure_aggregation",
            )
            if state.get(key) != current[key]
        ]
        if diffs:
            raise ConfigError(
                "checkpoint made with other settings; resume with them or start anew: " + "; ".join(diffs)
            )

    def _load_clients(self, state: dict[str, Any]) -> None:
        saved = state["clients"]
        if list(saved) != list(self.clients):
            raise ConfigError(
                f"checkpoint clients {list(saved)} differ from the data's clients {list(self.clients)} (names and "
                "order must match); resume with the same client names"
            )
        for name, client in self.clients.items():
            client.load_state_dict(saved[name])
        self.planned_rounds = state.get("planned_rounds")
        self.rounds_trained = state.get("rounds_trained", 0)
        self.rounds_run = state.get("rounds_run", self.rounds_trained)  # checkpoints from before empty rounds counted
        self.faults = list(state.get("faults", []))
        if self.user_level is not None:
            self.user_level.load_state_dict(state["user_level"])
        self.server_state = state.get("server_state", {})
        self._restored = None
        self._check_target_kept()

    def _check_target_kept(self) -> None:
        """Refuses a resume that would carry a target-calibrated run past its target epsilon."""
        rounds, planned = self.lightning_module.trainer.max_epochs, self.planned_rounds
        if self.privacy.target_epsilon is None or self.privacy.max_epsilon is not None or planned is None:
            return
        if rounds is None or rounds <= planned:
            return
        reach = {}
        for name, client in self.clients.items():
            done = sum(steps for _, _, steps in client.accountant.history)
            reach[name] = round(client.epsilon_after(rounds * client.steps_per_round - done, self.privacy.delta), 4)
        raise ConfigError(
            f"privacy.target_epsilon={self.privacy.target_epsilon} was calibrated for {planned} rounds; resuming to "
            f"{rounds} rounds would bring epsilon to {reach}. Resume with trainer.rounds={planned}, or set "
            "privacy.max_epsilon to cap the spending"
        )
