"""DistributedFederatedDPStrategy: the same rounds spread over Lightning's processes (CPU gloo or GPUs, nodes).

Each process owns a fixed subset of the clients (client ``i`` belongs to rank ``i % world_size``) and trains only
those; nothing is all-reduced during local training (no DistributedDataParallel). Lightning synchronises every
step, so each process pads its share of a round with empty batches up to the longest share. At the round's end
one all-reduce adds the processes' float64 FedAvg sums and weights, and one all-gather shares the clients' lasting
state and reports, so that every process holds the same global model, accountants and random streams; the
checkpoint, written once by rank 0, is therefore complete.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.ddp import _sync_module_states
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from fl_dp_lightning.config import ConfigError
from fl_dp_lightning.server.aggregate import combine_processes
from fl_dp_lightning.server.plan import RoundPlan
from fl_dp_lightning.strategy.federated_dp import FederatedRounds


class DistributedFederatedDPStrategy(FederatedRounds, DDPStrategy):
    """:class:`~fl_dp_lightning.FederatedDPStrategy` over several processes, launched by Lightning.

    Takes the federated arguments of ``FederatedDPStrategy`` (``privacy``, ``local_epochs``, ``client_fraction``,
    ``seed``, ``log_rounds``) and Lightning's ``DDPStrategy`` arguments (``start_method``,
    ``process_group_backend``, ...). Use ``Trainer(devices=N, num_nodes=M, strategy=...)``: with ``torchrun`` or
    SLURM, Lightning's own launchers start the processes.
    """

    strategy_name = "federated_dp_ddp"

    @override
    def _check_processes(self) -> None:
        server_side = {"user_privacy": self.user_privacy, "secure_aggregation": self.secure_aggregation}
        for key, config in server_side.items():
            if config.enabled:
                raise ConfigError(
                    f"{key}.enabled with several processes: the server's side must run once for all processes, "
                    "which is not built yet; train in one process (hardware=cpu or hardware=gpu)"
                )
        if self.syft is not None:
            raise ConfigError(
                "client.runtime=syft with several processes: the datasites answer one server process; train in "
                "one process (hardware=cpu or hardware=gpu)"
            )

    def owner(self, client: str) -> int:
        """The rank that trains ``client``."""
        return list(self.clients).index(client) % self.world_size

    @override
    def configure_ddp(self) -> None:
        # clients train apart and meet only at round end: no DistributedDataParallel, same initial weights
        _sync_module_states(self.model)

    @override
    def _rank_plan(self, plan: RoundPlan) -> RoundPlan:
        return RoundPlan(plan.round_idx, tuple(s for s in plan.segments if self.owner(s[0]) == self.global_rank))

    @override
    def _rank_round_length(self, plan: RoundPlan) -> int:
        if self.vectorized:
            return super()._rank_round_length(plan)
        per_rank = [0] * self.world_size
        for name, steps in plan.segments:
            per_rank[self.owner(name)] += steps
        return max(per_rank)

    @override
    def _combine_round(self) -> None:
        combine_processes(self._average, self._global_state, dist.all_reduce)

        mine = {name: self.clients[name].state_dict() for name in self._local_plan.clients}
        round_no = self._plan.round_idx + 1
        my_faults = [fault for fault in self.faults if fault["round"] == round_no]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (mine, self.last_round, my_faults))
        reports, faults = {}, []
        for rank, (states, rank_reports, rank_faults) in enumerate(gathered):
            for name, state in states.items():
                if name not in mine:
                    self.clients[name].load_state_dict(state)
            reports.update({r.client: r for r in rank_reports})
            faults += rank_faults
            for fault in rank_faults if rank != self.global_rank else []:  # logged where it happened, and on rank 0
                client, reason = fault["client"], fault["reason"]
                rank_zero_info(f"round {round_no}: client {client!r} was dropped on rank {rank}: {reason}")
        self.last_round = [reports[name] for name in self._plan.clients]
        # every rank holds every fault, in client order, so that rank 0's report and checkpoint list them all
        order = list(self.clients)
        faults.sort(key=lambda fault: order.index(fault["client"]))
        self.faults = [fault for fault in self.faults if fault["round"] != round_no] + faults
