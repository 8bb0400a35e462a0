"""The server's user-level DP state: its accountant, clip norm and secret noise stream (the math is in
:mod:`fl_dp_lightning.privacy.user_level`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fl_dp_lightning.config import ConfigError, UserPrivacyConfig
from fl_dp_lightning.privacy.accountants import epsilon_of_history, epsilon_spent, make_user_accountant
from fl_dp_lightning.privacy.calibration import smallest_noise_multiplier
from fl_dp_lightning.privacy.randomness import SERVER_STREAM, stream_generator
from fl_dp_lightning.privacy.tree import TreeNoise, epoch_depths, tree_depth, tree_history
from fl_dp_lightning.privacy.user_level import (
    clip_update,
    fitted_bit,
    fraction_fitted,
    gaussian_like,
    next_clip,
    noised_count,
    noised_mean,
    update_noise_multiplier,
)

ADJACENCY = "add/remove one client's whole data"
GUARANTEE = (
    "({epsilon:.4g}, {delta:g})-DP for the sequence of global models, under add/remove adjacency of one client's "
    "whole data; central DP: it holds against anyone but the server, which sees the clipped updates before the "
    "noise and which clients took part (it must keep both to itself)"
)


FTRL_GUARANTEE = (
    "({epsilon:.4g}, {delta:g})-DP for the sequence of global models, under add/remove adjacency of one client's "
    "whole data; DP-FTRL: tree-aggregated noise restarted every epoch, each client in at most one round an epoch "
    "(public: the epsilon does not rely on who took part staying secret); central DP: it holds against anyone but "
    "the server, which sees the clipped updates before the noise (it must keep them to itself)"
)


class UserLevelDP:
    """One run's user-level mechanism: clip each client's update, noise the sum, account each round. DP-FedAvg
    draws fresh noise each round; DP-FTRL (``mechanism=dp_ftrl``) releases the differences of tree-aggregated
    prefix sums (see :mod:`fl_dp_lightning.privacy.tree`).

    Args:
        config: the user-level settings.
        sample_rate: each client's probability of taking part in a round (1 when all do); under DP-FTRL, one
            over the rounds of an epoch.
        num_clients: the clients of the run (the expected number per round is ``sample_rate * num_clients``).
        seeded: draw the noise from the public ``seed`` (``privacy.unsafe_seeded_randomness``), else secretly.
        seed: the run's seed.
        device: where the model's parameters live (the noise is drawn there).
    """

    def __init__(
        self,
        config: UserPrivacyConfig,
        *,
        sample_rate: float,
        num_clients: int,
        seeded: bool,
        seed: int,
        device: torch.device,
    ):
        self.config = config
        self.sample_rate = sample_rate
        self.expected_clients = sample_rate * num_clients
        self.ftrl = config.mechanism == "dp_ftrl"
        # amplification by client sampling holds only while who took part stays secret (DP-FTRL claims none)
        self.accounted_rate = 1.0 if config.release_participation or self.ftrl else sample_rate
        self.rounds_per_epoch = round(1 / sample_rate)
        self.tree = TreeNoise()
        self.depths: list[int] = []
        """DP-FTRL: the depth each epoch is accounted with (the last one growing with its tree)."""
        self.epoch_rounds = 0
        """DP-FTRL: rounds released in the current epoch (its trees together)."""
        self.rounds_released = 0
        self.accountant = make_user_accountant(config.accountant)
        self.noise_multiplier = config.noise_multiplier
        self.clip = config.clip
        self.seeded = seeded
        self.generator = stream_generator(seeded=seeded, seed=seed, index=0, stream=SERVER_STREAM, device=device)
        self.centred_count = 0.0
        """The round's sum of centred count bits (before noise)."""
        self.released_count: float | None = None
        """The last round's noised count (adaptive clipping), which the next clip is computed from."""
        if config.adaptive_clipping:
            self.update_noise()  # refuses a count noise that leaves nothing for the updates

    @property
    def count_std(self) -> float:
        """Standard deviation of the noise on the clipped count: ``user_privacy.count_noise``, else the larger of
        the paper's expected clients / 20 and the noise multiplier (then the count takes at most a quarter of the
        noise budget: the updates' multiplier stays within 1.155 z)."""
        return self.config.count_noise or max(self.expected_clients / 20, self.noise_multiplier)

    def update_noise(self) -> float:
        """The noise multiplier of the updates: all of it, or what the count query leaves (adaptive clipping)."""
        if not self.config.adaptive_clipping:
            return self.noise_multiplier
        try:
            return update_noise_multiplier(self.noise_multiplier, self.count_std)
        except ValueError as err:
            raise ConfigError(f"user_privacy.count_noise={self.count_std:g}: {err}; raise it") from err

    def calibrate(self, rounds: int) -> float:
        """Sets the noise multiplier so that ``rounds`` rounds spend ``config.target_epsilon``."""

        def epsilon(sigma: float) -> float:
            self.noise_multiplier = sigma
            return self.epsilon_after(rounds)

        self.noise_multiplier = smallest_noise_multiplier(
            epsilon, self.config.target_epsilon, key="user_privacy.target_epsilon"
        )
        return self.noise_multiplier

    def clipped(self, update: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A client's update clipped to the current norm (and counted when it fitted)."""
        clipped, norm = clip_update(update, self.clip)
        self.centred_count += fitted_bit(norm, self.clip)
        return clipped

    def _release_tree(self, summed: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """DP-FTRL's round: the sum plus ``N(t) - N(t-1)`` of the epoch's tree, over the expected clients; the
        epoch's depth is accounted as its deepest tree so far."""
        if self.epoch_rounds == self.rounds_per_epoch:  # a new epoch: a new tree
            self.epoch_rounds, self.tree = 0, TreeNoise()
        if self.epoch_rounds == 0:
            self.depths.append(0)
        noise = self.tree.next(gaussian_like(summed, self.noise_multiplier * self.clip, self.generator))
        self.epoch_rounds += 1
        self.depths[-1] = max(self.depths[-1], tree_depth(self.tree.leaves))
        self.accountant.history = tree_history(self.noise_multiplier, self.depths)
        return {k: (t + noise[k]) / self.expected_clients for k, t in summed.items()}

    def release(self, summed: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The round's noised mean update from the sum of clipped updates; accounts the round, and moves the clip
        under adaptive clipping (from the noised count: post-processing)."""
        self.rounds_released += 1
        if self.ftrl:
            return self._release_tree(summed)
        mean = noised_mean(
            summed,
            clip=self.clip,
            noise_multiplier=self.update_noise(),
            expected_clients=self.expected_clients,
            generator=self.generator,
        )
        if self.config.adaptive_clipping:
            self.released_count = noised_count(self.centred_count, count_std=self.count_std, generator=self.generator)
            self.clip = next_clip(
                self.clip,
                fraction_fitted(self.released_count, self.expected_clients),
                target_quantile=self.config.target_quantile,
                learning_rate=self.config.clip_learning_rate,
            )
        self.centred_count = 0.0
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.accounted_rate)
        return mean

    def epsilon(self) -> float:
        return epsilon_spent(self.accountant, self.config.delta)

    def epsilon_after(self, rounds: int) -> float:
        """The user-level epsilon after ``rounds`` rounds from the start at the current noise."""
        if self.ftrl:
            history = tree_history(self.noise_multiplier, epoch_depths(rounds, self.rounds_per_epoch))
        else:
            history = [(self.noise_multiplier, self.accounted_rate, rounds)]
        return epsilon_of_history(type(self.accountant), history, self.config.delta)

    def report(self, guaranteed: bool) -> dict[str, Any]:
        """The report's user-level section."""
        epsilon = self.epsilon()
        return {
            "epsilon": epsilon,
            "delta": self.config.delta,
            "accountant": self.config.accountant,
            "adjacency": ADJACENCY,
            "noise_multiplier": self.noise_multiplier,
            "clip": self.clip,
            "sample_rate": self.sample_rate,
            "accounted_sample_rate": self.accounted_rate,
            "expected_clients": self.expected_clients,
            "rounds": self.rounds_released,
            "mechanism": self.config.mechanism,
            "participation": self.participation(),
            "not_covered": [],
            "guarantee": (FTRL_GUARANTEE if self.ftrl else GUARANTEE).format(epsilon=epsilon, delta=self.config.delta)
            if guaranteed
            else "none proven: privacy.unsafe_seeded_randomness makes the server noise a function of trainer.seed",
        }

    @property
    def participation_secret(self) -> bool:
        """Whether the epsilon relies on who took part staying secret (sampled clients, not released)."""
        return self.sample_rate < 1 and not self.config.release_participation and not self.ftrl

    def participation(self) -> str:
        """What the run released of who took part, and what the user-level epsilon assumes of it."""
        if self.sample_rate >= 1:
            return "every client in every round: nothing to hide"
        if self.ftrl:
            return (
                "public (DP-FTRL): each client takes part in one round of each epoch, drawn from the run's seed and "
                "its name; the epsilon does not rely on it staying secret"
            )
        if self.config.release_participation:
            return (
                "released (user_privacy.release_participation): the epsilon is accounted without amplification by "
                "client sampling"
            )
        return (
            "withheld: no per-client round line, epsilon or step count was logged or reported; the epsilon's "
            "amplification by client sampling holds while the server keeps the draws to itself"
        )

    def state_dict(self) -> dict[str, Any]:
        state = {
            "accountant": self.accountant.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "clip": self.clip,
            "depths": list(self.depths),
            "epoch_rounds": self.epoch_rounds,
            "rounds_released": self.rounds_released,
        }
        if self.seeded:  # a secret stream (and the tree noise drawn from it) never leaves the process
            state["generator"] = self.generator.get_state()
            state["tree"] = self.tree.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.noise_multiplier, self.clip = state["noise_multiplier"], state["clip"]
        self.depths, self.epoch_rounds = list(state.get("depths", [])), state.get("epoch_rounds", 0)
        self.rounds_released = state.get("rounds_released", sum(steps for _, _, steps in self.accountant.history))
        if self.seeded:
            self.generator.set_state(state["generator"])
            self.tree.load_state_dict(state.get("tree", {"leaves": 0, "nodes": {}}))
        # else a secret tree's node noise is gone: the rest of the epoch starts a new tree, and the epoch stays
        # accounted with its deepest tree (a client's one round of the epoch lies in one of them)
