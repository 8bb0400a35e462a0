"""The vectorized client engine: the clients of a round train at once, each with its own weights.

With ``torch.func`` the module's ``forward`` and a per-example loss become one function of the weights, which is
mapped over a client's records (per-example gradients) and over the clients (``vmap``). Each client keeps what
the Opacus engine gives it: its own Poisson batches (drawn from its own sampler stream, so the same seed gives the
same batches under both engines), its clip norm, its noise (Opacus's own generator function, from its own noise
stream), its sample rate, steps and accountant. Clients are trained in chunks sized to fit memory.

What it cannot run it refuses before any step (:meth:`VectorizedClients.check`): data that is not a
``TensorDataset(inputs, targets)``, BatchNorm (its running statistics are updated from the batch), optimizers
other than SGD, per-step LR schedules, and forwards that ``torch.func`` cannot transform. The module's
``training_step`` is not called; validation and test still run the module's own steps on the global model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
import torch
from opacus.optimizers.optimizer import _generate_noise
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import SGD, Optimizer
from torch.utils.data import Dataset, TensorDataset

from fl_dp_lightning.config import ConfigError, EngineConfig, PrivacyConfig
from fl_dp_lightning.strategy.client import ClientState
from fl_dp_lightning.vectorized.dpsgd import CLASSIFICATION_LOSSES, LOSSES, clip_and_sum, sgd_step

SGD_SETTINGS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
CPU_MEMORY_BUDGET = 2 * 2**30
"""Bytes a chunk's per-example gradients may take on the CPU (on a GPU: half of the free memory)."""
ACTIVATION_FACTOR = 3
"""Per-example memory as a multiple of the parameters' size (gradients, clipped copies, activations)."""


@dataclass
class ClientUpdate:
    """A client's weights after its round (parameters only) and its training metrics."""

    client: ClientState
    params: dict[str, Tensor]
    metrics: dict[str, float]


def check_vectorizable(
    module: nn.Module, optimizer: Optimizer, step_schedulers: int, datasets: Mapping[str, Dataset], precision: str
) -> None:
    """Refuses, in one line with the fix, what the vectorized engine cannot train (before any privacy is spent)."""
    problems = []
    for name, dataset in datasets.items():
        if not (isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2):
            problems.append(
                f"client {name!r} holds a {type(dataset).__name__}: it needs each client's data as "
                "TensorDataset(inputs, targets)"
            )
            break
    norms = sorted({type(m).__name__ for m in module.modules() if isinstance(m, _BatchNorm)})
    if norms:
        problems.append(
            f"{', '.join(norms)} updates running statistics from each batch, which a functional step cannot carry; "
            "set privacy.fix_modules=true (it becomes GroupNorm)"
        )
    if type(optimizer) is not SGD:
        problems.append(f"it runs SGD (lr, momentum, weight decay, nesterov); configure_optimizers returned "
                        f"{type(optimizer).__name__}")
    if step_schedulers:
        problems.append("an LR scheduler with interval='step' would step once per round; use interval='epoch'")
    if precision not in ("32", "32-true"):
        problems.append(f"precision={precision!r}: it trains in float32; use precision=32")
    if problems:
        raise ConfigError("engine=vectorized cannot train this run: " + "; ".join(problems) + " (or use engine=opacus)")


class VectorizedClients:
    """Trains clients from the global weights for their round's steps, many at once.

    Args:
        module: the module whose ``forward`` maps a batch of inputs to outputs (the LightningModule).
        optimizer: its SGD optimizer: which parameters train, with their groups' settings (read every round, so
            epoch-level LR schedules apply).
        datasets: each client's ``TensorDataset(inputs, targets)``, in client order.
        engine: the loss and the chunk size.
        privacy: clipping, noise and loss reduction (``enabled=False``: plain local SGD on the batch mean).
        device: where the data is kept (moved once) and the clients train.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        datasets: Mapping[str, TensorDataset],
        *,
        engine: EngineConfig,
        privacy: PrivacyConfig,
        device: torch.device,
    ):
        self.module = module
        self.optimizer = optimizer
        self.privacy = privacy
        self.engine = engine
        self.loss = LOSSES[engine.loss]
        self.classification = engine.loss in CLASSIFICATION_LOSSES
        self.device = device
        names = {id(p): n for n, p in module.named_parameters()}
        self.groups = [[names[id(p)] for p in g["params"] if p.requires_grad] for g in optimizer.param_groups]
        self.trained = [name for group in self.groups for name in group]  # Opacus's parameter order
        sizes = [len(d) for d in datasets.values()]
        self.offsets = dict(zip(datasets, torch.tensor([0, *sizes[:-1]]).cumsum(0).tolist()))
        self.inputs = torch.cat([d.tensors[0] for d in datasets.values()]).to(device)
        self.targets = torch.cat([d.tensors[1] for d in datasets.values()]).to(device)
        inner = vmap(grad(self._example_loss, has_aux=True), in_dims=(None, None, 0, 0), randomness="different")
        self._per_example = vmap(inner, in_dims=(0, None, 0, 0), randomness="different")
        self._batch = vmap(grad(self._batch_loss, has_aux=True), in_dims=(0, None, 0, 0, 0), randomness="different")
        self._trial()

    # ----------------------------------------------------------- the functions torch.func transforms

    def _outputs(self, params: dict[str, Tensor], frozen: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple:
        output = functional_call(self.module, {**params, **frozen}, (x,))
        losses = self.loss(output, y)
        correct = (output.argmax(-1) == y).float() if self.classification else torch.zeros_like(losses)
        return losses, correct

    def _example_loss(self, params: dict, frozen: dict, x: Tensor, y: Tensor) -> tuple[Tensor, tuple]:
        losses, correct = self._outputs(params, frozen, x.unsqueeze(0), y.unsqueeze(0))
        return losses.sum(), (losses.detach().sum(), correct.sum())

    def _batch_loss(self, params: dict, frozen: dict, x: Tensor, y: Tensor, mask: Tensor) -> tuple[Tensor, tuple]:
        losses, correct = self._outputs(params, frozen, x, y)
        total = (losses * mask).sum()
        scale = mask.sum().clamp(min=1) if self.privacy.loss_reduction == "mean" else 1
        return total / scale, (total.detach(), (correct * mask).sum())

    def _trial(self) -> None:
        """Runs one step's gradients on two random records shaped like the data (no client record is used)."""
        x = torch.randn((1, 2, *self.inputs.shape[1:]), device=self.device).to(self.inputs.dtype)
        y = torch.zeros((1, 2, *self.targets.shape[1:]), dtype=self.targets.dtype, device=self.device)
        params, frozen = self._start_weights(1)
        try:
            if self.privacy.enabled:
                self._per_example(params, frozen, x, y)
            else:
                self._batch(params, frozen, x, y, torch.ones((1, 2), device=self.device))
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ConfigError(
                f"engine=vectorized cannot transform {type(self.module).__name__}.forward with torch.func "
                f"({type(err).__name__}: {first}); use engine=opacus, or make forward free of in-place state "
                f"changes and data-dependent Python control flow (loss {self.engine.loss!r})"
            ) from err

    # ------------------------------------------------------------------------------- a round

    def _start_weights(self, count: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The global weights stacked ``count`` times (trained parameters) and the rest, shared."""
        state = {**dict(self.module.named_parameters()), **dict(self.module.named_buffers())}
        params = {n: state[n].detach().unsqueeze(0).repeat(count, *[1] * state[n].dim()) for n in self.trained}
        frozen = {n: v.detach() for n, v in state.items() if n not in params}
        return params, frozen

    def chunk_size(self, clients: Sequence[ClientState]) -> int:
        """Clients per chunk: ``engine.clients_per_chunk``, or as many as the memory budget allows."""
        if self.engine.clients_per_chunk is not None:
            return self.engine.clients_per_chunk
        budget = CPU_MEMORY_BUDGET if self.device.type != "cuda" else torch.cuda.mem_get_info(self.device)[0] // 2
        numel = sum(p.numel() for n, p in self.module.named_parameters() if n in self.trained)
        records = max(c.batch_size for c in clients) if self.privacy.enabled else 1
        per_client = ACTIVATION_FACTOR * 4 * numel * 2 * records  # twice the expected batch: Poisson's spread
        return max(1, int(budget // per_client))

    def train(self, clients: Sequence[ClientState], proximal_mu: float = 0.0) -> Iterator[ClientUpdate]:
        """Each client's round from the module's current (global) weights, chunk after chunk."""
        size = self.chunk_size(clients)
        for start in range(0, len(clients), size):
            yield from self._train_chunk(list(clients[start : start + size]), proximal_mu)

    def _train_chunk(self, chunk: list[ClientState], proximal_mu: float) -> Iterator[ClientUpdate]:
        count = len(chunk)
        params, frozen = self._start_weights(count)
        initial = {n: p[0] for n, p in params.items()}
        settings = [{k: g[k] for k in SGD_SETTINGS} for g in self.optimizer.param_groups]
        buffers: dict[str, Tensor | None] = dict.fromkeys(self.trained)
        batches = [c.batch_indices() for c in chunk]
        steps = torch.tensor([c.steps_per_round for c in chunk])
        loss_sums, correct_sums, records = (torch.zeros(count, device=self.device) for _ in range(3))
        for step in range(int(steps.max())):
            active = (steps > step).tolist()
            x, y, mask = self._gather(chunk, [next(b) if a else [] for b, a in zip(batches, active)])
            if self.privacy.enabled:
                grads, (losses, correct) = self._per_example(params, frozen, x, y)
                grads = self._noised(chunk, active, clip_and_sum(grads, mask, self._per_client(chunk, "max_grad_norm")))
                losses, correct = (losses * mask).sum(1), (correct * mask).sum(1)
            else:
                grads, (losses, correct) = self._batch(params, frozen, x, y, mask)
            loss_sums, correct_sums, records = loss_sums + losses, correct_sums + correct, records + mask.sum(1)
            keep = torch.tensor(active, device=self.device)
            for names, setting in zip(self.groups, settings):
                for name in names:
                    gradient = grads[name]
                    if proximal_mu:  # FedProx, after clipping and noise: it depends on the weights alone
                        gradient = gradient + proximal_mu * (params[name] - initial[name])
                    updated, buffers[name] = sgd_step(params[name], gradient, buffers[name], **setting)
                    params[name] = torch.where(keep.view(-1, *[1] * initial[name].dim()), updated, params[name])
            for client, took_step in zip(chunk, active):
                if took_step:
                    client.steps_taken += 1
                    if client.accountant is not None:
                        client.accountant.step(noise_multiplier=client.noise_multiplier, sample_rate=client.sample_rate)
        for c, client in enumerate(chunk):
            seen = float(records[c])
            metrics = {"loss": float(loss_sums[c]) / seen} if seen else {}
            if seen and self.classification:
                metrics["acc"] = float(correct_sums[c]) / seen
            yield ClientUpdate(client, {n: p[c] for n, p in params.items()}, metrics)

    def _per_client(self, chunk: list[ClientState], attribute: str) -> Tensor:
        return torch.tensor([float(getattr(c, attribute)) for c in chunk], device=self.device)

    def _gather(self, chunk: list[ClientState], batches: list[list[int]]) -> tuple[Tensor, Tensor, Tensor]:
        """The chunk's batches padded to the longest (padding repeats a client's first record, masked out)."""
        width = max(1, max(len(b) for b in batches))
        rows = []
        for client, batch in zip(chunk, batches):
            offset = self.offsets[client.name]
            rows.append([offset + i for i in batch] + [offset] * (width - len(batch)))
        index = torch.tensor(rows, device=self.device)
        lengths = torch.tensor([len(b) for b in batches], device=self.device)
        mask = (torch.arange(width, device=self.device) < lengths[:, None]).float()
        return self.inputs[index], self.targets[index], mask

    def _noised(self, chunk: list[ClientState], active: list[bool], summed: dict[str, Tensor]) -> dict[str, Tensor]:
        """Opacus's noise (from each client's own stream, parameter by parameter in its order) on each active
        client's clipped sum, scaled for the loss reduction; inactive clients' rows are left as they are."""
        out = {}
        for name in self.trained:
            rows = list(summed[name].unbind(0))
            for c, client in enumerate(chunk):
                if active[c]:
                    std = client.noise_multiplier * client.max_grad_norm
                    rows[c] = rows[c] + _generate_noise(std, rows[c], client.noise_rng, self.privacy.secure_mode)
            out[name] = torch.stack(rows)
        if self.privacy.loss_reduction == "mean":  # Opacus divides by the expected batch size
            batch = self._per_client(chunk, "batch_size")
            out = {name: g / batch.view(-1, *[1] * (g.dim() - 1)) for name, g in out.items()}
        return out
