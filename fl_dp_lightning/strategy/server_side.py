"""The server's end of a round in the strategy: each client's update checked and added, the round finished
through :func:`~fl_dp_lightning.server.round.finish_round` and loaded (a mixin of
:class:`~fl_dp_lightning.strategy.federated_dp.FederatedRounds`)."""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info

from fl_dp_lightning.config import ConfigError
from fl_dp_lightning.server.round import add_update, finish_round
from fl_dp_lightning.server.secure_sum import WEIGHT_HEADROOM, check_capacity
from fl_dp_lightning.update import ClientUpdate


class ServerSide:
    """Adds the round's client updates and finishes the round, for every engine and process layout."""

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

    def _end_client(self) -> None:
        self._add_update(self._loop.end(self.round_index + 1, self.lightning_module.state_dict()))

    def _add_update(self, update: ClientUpdate) -> None:
        """The server's side of a client's update: a failure is recorded (the privacy the client spent stays
        counted), trained weights are checked and added to the round's aggregate."""
        if update.failure is not None:
            self.faults.append({"round": update.round, "client": update.client, "reason": update.failure})
            who = "a client" if self.participation_withheld else f"client {update.client!r}"
            rank_zero_info(
                f"round {update.round}: {who} is dropped from this round ({update.failure}); the round averages the "
                "others, and the privacy it spent so far stays counted"
            )
            self.last_round.append(update)
            return
        # the client's released (noised) weights: checking them is post-processing, it costs no privacy
        if not all(torch.isfinite(update.params[name]).all() for name, _ in self.lightning_module.named_parameters()):
            raise ConfigError(
                f"client {update.client!r} ended round {update.round} with "
                "non-finite weights (the training diverged): lower the learning rate (model.lr) or check the data"
            )
        self.updates_added += 1
        add_update(self._average, update, self._global_state, self.user_level)
        self.last_round.append(update.averaged())

    def _add_canary_clients(self) -> None:
        """An audit's canary clients under user-level DP: each present one (its coin true) taken with the clients'
        sample rate, its update (one step of lr 1 on its Dirac gradient) clipped and added as any client's."""
        canaries = self.canary_clients
        sampled = canaries.sample(self.user_level.sample_rate)
        for i in sampled[canaries.coins[sampled]].tolist():
            step = canaries.summed(torch.tensor([i]), self._global_state)
            params = {name: self._global_state[name] - grad for name, grad in step.items()}
            update = ClientUpdate(f"canary-{i}", self.round_index + 1, params, num_examples=1, steps=1)
            add_update(self._average, update, self._global_state, self.user_level)

    def _end_round(self) -> None:
        if self.canary_clients is not None:
            self._add_canary_clients()
        self.rounds_trained += 1
        self.rounds_run += 1
        self._combine_round()
        state, self.server_state = finish_round(
            self._global_state,
            self._average,
            user_level=self.user_level,
            server=self.server,
            server_state=self.server_state,
        )
        if state is None:
            rank_zero_info("no client finished this round: the global model stays as it is")
        self.lightning_module.load_state_dict(self._global_state if state is None else state)
        self._plan, self._global_state = None, {}
