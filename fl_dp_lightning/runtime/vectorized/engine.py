"""The vectorized client engine: the clients of a round train at once, each with its own weights.

With ``torch.func`` the module's ``forward`` and a per-example loss become one function of the weights, which is
mapped over a client's records (per-example gradients) and over the clients (``vmap``). Each client keeps what
the Opacus engine gives it: its own Poisson batches (drawn from its own sampler stream, so the same seed gives the
same batches under both engines), its clip norm, its noise (Opacus's own generator function, from its own noise
stream), its sample rate, steps and accountant. Clients are trained in chunks sized to fit memory.

On a GPU the chunk's clients are one ``vmap``; on CPU cores a loop over the chunk's clients is faster (measured:
benchmarks/speed.py), so the engine loops there, and takes each client's batch through the module's own layers in
the channels-last layout, with Opacus's per-layer rules for the per-example gradients (``engine.per_example``;
checked against ``vmap`` before training, which it falls back to). A round's first step, where every client still
holds the global weights, runs the records of many clients in one pass. With ``engine.compile`` each client's
batch is padded to one static width and the step compiled; a Poisson batch wider than that is cut into several
padded slices whose clipped sums add up, so padding never changes the result.

What it cannot run it refuses before any step (:meth:`VectorizedClients.check`): data that is not a
``TensorDataset(inputs, targets)``, BatchNorm (its running statistics are updated from the batch), optimizers
other than SGD, per-step LR schedules, and forwards that ``torch.func`` cannot transform. The module's
``training_step`` is not called; validation and test still run the module's own steps on the global model.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.optim import Optimizer
from torch.utils.data import TensorDataset

from fl_dp_lightning.config import ConfigError, EngineConfig, PrivacyConfig
from fl_dp_lightning.privacy.per_example import (
    LayerRules,
    channels_last,
    layer_rules,
    loaded,
    per_example_gradients,
)
from fl_dp_lightning.privacy.probe import ATOL, RTOL, changed_attributes, probe_sizes, tensor_attributes
from fl_dp_lightning.runtime.client import ClientState
from fl_dp_lightning.runtime.sampling import same_format
from fl_dp_lightning.runtime.vectorized.dpsgd import (
    CLASSIFICATION_LOSSES,
    LOSSES,
    clip_and_sum,
    clip_and_sum_by_client,
    gaussian_noise,
    sgd_step,
)
from fl_dp_lightning.update import ClientUpdate, RoundRequest

SGD_SETTINGS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
CPU_MEMORY_BUDGET = 2 * 2**30
"""Bytes a chunk's per-example gradients may take on the CPU (on a GPU: half of the free memory)."""
ACTIVATION_FACTOR = 3
"""Per-example memory as a multiple of the parameters' size (gradients, clipped copies, activations)."""
SHARED_PASS = 1024
"""Records per pass, at most, when the clients of a chunk share their weights (a round's first step)."""
POISSON_SPREAD = 4
"""Static width of a compiled Poisson batch: the expected size plus this many standard deviations."""


class VectorizedClients:
    """Trains clients from the global weights for their round's steps, many at once.

    Args:
        module: the module whose ``forward`` maps a batch of inputs to outputs (the LightningModule).
        optimizer: its SGD optimizer: which parameters train, with their groups' settings (read every round, so
            epoch-level LR schedules apply).
        datasets: each client's ``TensorDataset(inputs, targets)``, in client order.
        clients: each client's state (batch size, sampling), in the same order.
        engine: the loss, chunk size and compilation.
        privacy: clipping, noise and loss reduction (``enabled=False``: plain local SGD on the batch).
        device: where the data is kept (moved once) and the clients train.
        public: public records in the clients' format (the shared test set), for the trial before training (the
            data's scale); random records when ``None``.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        datasets: Mapping[str, TensorDataset],
        clients: Sequence[ClientState],
        *,
        engine: EngineConfig,
        privacy: PrivacyConfig,
        device: torch.device,
        public: TensorDataset | None = None,
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
        self.width = max(static_width(c.batch_size, c.poisson) for c in clients) if engine.compile else None
        self.rules = self._layer_rules()
        self.channels_last = engine.channels_last_on(device)
        self.clients_at_once = device.type == "cuda" and self.rules is None
        self._vmap_grads = vmap(
            grad(self._example_loss, has_aux=True), in_dims=(None, None, 0, 0), randomness="different"
        )
        self._step = self._prepare(self._client_sums)
        self._trial_sizes = probe_sizes([c.batch_size for c in clients])
        self._public = (
            public if public is not None and same_format(public, (self.inputs[:0], self.targets[:0])) else None
        )
        self._trial()

    def _layer_rules(self) -> LayerRules | None:
        """Opacus's per-layer rules for the per-example gradients where they are chosen (``engine.per_example``;
        under ``auto``: on CPU cores, eager, when every trained layer has one), else ``None`` (``vmap``)."""
        choice = self.engine.per_example
        if choice == "vmap" or not self.privacy.enabled:
            return None
        if choice == "auto" and (self.device.type != "cpu" or self.engine.compile):
            return None
        rules = layer_rules(self.module, self.trained)
        if isinstance(rules, LayerRules):
            return rules
        if choice == "layers":
            raise ConfigError(
                f"engine.per_example=layers cannot train this module: {rules}; use engine.per_example=vmap"
            )
        return None

    def _prepare(self, step: Any) -> Any:
        if self.rules is not None:  # a loop over the clients, each batch through the module's own layers
            return step
        if self.engine.compile:
            step = torch.compile(step, dynamic=False)
        if self.clients_at_once:
            step = vmap(step, in_dims=(0, None, 0, 0, 0, 0), randomness="different")
        return step

    # ----------------------------------------------------------- the functions torch.func transforms

    def _outputs(self, params: dict[str, Tensor], frozen: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple:
        output = functional_call(self.module, {**params, **frozen}, (x,))
        losses = self.loss(output, y)
        return losses, self._correct(output, y, losses)

    def _correct(self, output: Tensor, y: Tensor, losses: Tensor) -> Tensor:
        """1 where an example's prediction is its target (zeros for losses that are not classification)."""
        return (output.argmax(-1) == y).float() if self.classification else torch.zeros_like(losses)

    def _example_loss(self, params: dict, frozen: dict, x: Tensor, y: Tensor) -> tuple[Tensor, tuple]:
        losses, correct = self._outputs(params, frozen, x.unsqueeze(0), y.unsqueeze(0))
        return losses.sum(), (losses.detach().sum(), correct.sum())

    def _batch_loss(self, params: dict, frozen: dict, x: Tensor, y: Tensor, mask: Tensor) -> tuple[Tensor, tuple]:
        losses, correct = self._outputs(params, frozen, x, y)
        total = (losses * mask).sum()
        return total, (total.detach(), (correct * mask).sum())

    def _client_sums(
        self, params: dict, frozen: dict, x: Tensor, y: Tensor, mask: Tensor, max_grad_norm: Tensor
    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """One client's padded batch: the sum of its records' gradients (each clipped under DP), of their losses
        and of their correct predictions."""
        if not self.privacy.enabled:
            grads, (loss, correct) = grad(self._batch_loss, has_aux=True)(params, frozen, x, y, mask)
            return grads, loss, correct
        grads, losses, correct = self._example_grads(params, frozen, x, y)
        summed = clip_and_sum({n: g[None] for n, g in grads.items()}, mask[None], max_grad_norm[None])
        return {n: g[0] for n, g in summed.items()}, (losses * mask).sum(), (correct * mask).sum()

    def _example_grads(self, params: dict, frozen: dict, x: Tensor, y: Tensor) -> tuple[dict, Tensor, Tensor]:
        """Each example's gradient (``[n, *shape]`` by name), loss and correct prediction."""
        if self.rules is None:
            grads, (losses, correct) = self._vmap_grads(params, frozen, x, y)
            return grads, losses, correct
        with loaded(self.rules.parameters, params, layout_channels_last=self.channels_last):
            x = channels_last(x) if self.channels_last else x
            grads, losses, output = per_example_gradients(self.rules, self.module, x, y, self.loss)
        return grads, losses, self._correct(output, y, losses)

    def _trial(self) -> None:
        """Runs one step on random records shaped like the data (no client record is used): refuses a forward
        torch.func cannot transform or that keeps state across calls, checks Opacus's per-layer rules against
        ``vmap`` (each example alone) at the clients' batch sizes and their Poisson tail, and falls back to
        ``vmap`` or eager where the rules or compilation fail."""
        width = self.width or 2
        x = torch.randn((1, width, *self.inputs.shape[1:]), device=self.device).to(self.inputs.dtype)
        y = torch.zeros((1, width, *self.targets.shape[1:]), dtype=self.targets.dtype, device=self.device)
        mask = (torch.arange(width, device=self.device) < 2).float()[None]
        before = {name: b.detach().clone() for name, b in self.module.named_buffers()}
        failure = None
        try:
            self._run_step(*self._start_weights(1), x, y, mask, torch.ones(1, device=self.device))
            if self.privacy.enabled:
                self._check_per_example()
        except ConfigError:
            raise
        except Exception as err:
            failure = err
        changed = [name for name, b in self.module.named_buffers() if not torch.equal(b, before[name])]
        for name, buffer in self.module.named_buffers():
            buffer.copy_(before[name])
        if failure is not None:
            return self._recover(failure)
        if changed:
            raise ConfigError(
                f"engine=vectorized: {type(self.module).__name__}.forward changes its buffers {changed}, which a "
                "functional step cannot carry; use engine=opacus, or keep forward free of state changes"
            )
        return None

    def _trial_batch(self, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``size`` public records (drawn with replacement), else random ones at the normalised scale."""
        if self._public is not None:
            index = torch.randint(len(self._public), (size,), generator=generator)
            x, y = (t[index].to(self.device) for t in self._public.tensors)
            return x, y
        x = torch.randn((size, *self.inputs.shape[1:]), generator=generator).to(self.device, self.inputs.dtype)
        y = torch.zeros((size, *self.targets.shape[1:]), dtype=self.targets.dtype, device=self.device)
        return x, y

    def _check_per_example(self) -> None:
        """At each trial size: the same batch twice gives the same per-example gradients (else the forward keeps
        state across calls: refused), and the per-layer rules give each example's own (``vmap``) gradient (else
        RuntimeError: the forward mixes a batch's examples, or a rule misreads a layer; ``vmap`` takes over)."""
        params, frozen = self._start_weights(1)
        params = {n: p[0] for n, p in params.items()}
        generator = torch.Generator().manual_seed(0)
        for size in self._trial_sizes:
            x, y = self._trial_batch(size, generator)
            held = tensor_attributes(self.module)
            got, _, _ = self._example_grads(params, frozen, x, y)
            again, _, _ = self._example_grads(params, frozen, x, y)
            if not all(torch.allclose(got[n], again[n], rtol=RTOL, atol=ATOL) for n in got):
                names = changed_attributes(held, tensor_attributes(self.module))
                raise ConfigError(
                    f"engine=vectorized: {type(self.module).__name__}.forward gives other gradients for the same "
                    f"batch on its second call: it keeps state across calls{f' in {names}' if names else ''}, which "
                    "would carry one client's records into another's update; compute forward from its input alone"
                )
            if self.rules is not None:
                expected, _ = self._vmap_grads(params, frozen, x, y)
                for name, value in expected.items():
                    if not torch.allclose(got[name], value, rtol=RTOL, atol=ATOL):
                        raise RuntimeError(f"the per-layer rules' gradient of {name} is not each example's own")

    def _recover(self, err: Exception) -> None:
        """After a failed trial: ``vmap`` instead of the per-layer rules, eager instead of compiled, or a refusal."""
        if self.rules is not None:
            if self.engine.per_example == "layers":
                raise ConfigError(
                    f"engine.per_example=layers cannot train {type(self.module).__name__} "
                    f"({type(err).__name__}: {_first_line(err)}); use engine.per_example=vmap"
                ) from err
            self.rules, self.clients_at_once = None, self.device.type == "cuda"
            self._step = self._prepare(self._client_sums)
            return self._trial()
        if self.engine.compile:
            warnings.warn(
                f"engine.compile: torch.compile failed ({type(err).__name__}: {_first_line(err)}); training eagerly",
                stacklevel=3,
            )
            self.engine = replace(self.engine, compile=False)
            self.width, self._step = None, self._prepare(self._client_sums)
            return self._trial()
        raise ConfigError(
            f"engine=vectorized cannot transform {type(self.module).__name__}.forward with torch.func "
            f"({type(err).__name__}: {_first_line(err)}); use engine=opacus, or make forward free of in-place "
            f"state changes and data-dependent Python control flow (loss {self.engine.loss!r})"
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
        records = max(c.batch_size for c in clients) if self.privacy.enabled else 1
        return max(1, self._records_in_memory() // (2 * records))  # twice the expected batch: Poisson's spread

    def _records_in_memory(self) -> int:
        """How many records' per-example gradients fit the memory budget at once."""
        budget = CPU_MEMORY_BUDGET if self.device.type != "cuda" else torch.cuda.mem_get_info(self.device)[0] // 2
        numel = sum(p.numel() for n, p in self.module.named_parameters() if n in self.trained)
        return int(budget // (ACTIVATION_FACTOR * 4 * numel))

    def train(self, request: RoundRequest, clients: Sequence[ClientState]) -> Iterator[ClientUpdate]:
        """Each client's round from the module's current (global) weights, chunk after chunk."""
        size = self.chunk_size(clients)
        for start in range(0, len(clients), size):
            yield from self._train_chunk(list(clients[start : start + size]), request)

    def _train_chunk(self, chunk: list[ClientState], request: RoundRequest) -> Iterator[ClientUpdate]:
        proximal_mu = request.proximal_mu
        count = len(chunk)
        params, frozen = self._start_weights(count)
        initial = {n: p[0] for n, p in params.items()}
        settings = [{k: g[k] for k in SGD_SETTINGS} for g in self.optimizer.param_groups]
        buffers: dict[str, Tensor | None] = dict.fromkeys(self.trained)
        batches = [c.batch_indices() for c in chunk]
        steps = torch.tensor([c.steps_per_round for c in chunk])
        loss_sums, correct_sums, records = (torch.zeros(count, device=self.device) for _ in range(3))
        max_norm, batch = self._per_client(chunk, "max_grad_norm"), self._per_client(chunk, "batch_size")
        for step in range(int(steps.max())):
            active = (steps > step).tolist()
            drawn = [next(b) if a else [] for b, a in zip(batches, active)]
            grads, losses, correct = self._sums(params, frozen, chunk, drawn, max_norm, shared=step == 0)
            sizes = torch.tensor([len(b) for b in drawn], device=self.device, dtype=loss_sums.dtype)
            loss_sums, correct_sums, records = loss_sums + losses, correct_sums + correct, records + sizes
            grads = self._with_canaries(chunk, active, grads)
            if self.privacy.enabled:
                grads = self._noised(chunk, active, grads, batch)
            else:
                grads = self._batch_mean(grads, sizes)
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
            seen = float(records[c]) if request.release_metrics else 0.0
            metrics = {"loss": float(loss_sums[c]) / seen} if seen else {}
            if seen and self.classification:
                metrics["acc"] = float(correct_sums[c]) / seen
            trained = {n: p[c] for n, p in params.items()}
            yield ClientUpdate(
                client.name, request.round, trained, client.num_examples, client.steps_per_round, metrics
            )

    def _sums(
        self,
        params: dict[str, Tensor],
        frozen: dict[str, Tensor],
        chunk: list[ClientState],
        batches: list[list[int]],
        max_norm: Tensor,
        shared: bool = False,
    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Each client's (clipped) gradient sum, loss sum and correct count over its batch, ``[C, ...]``: in
        slices of the static width when compiled (sums add up), else in one slice as wide as the longest batch.
        ``shared``: every client still holds the global weights (a round's first step)."""
        longest = max(len(b) for b in batches)
        width = self.width or max(1, longest)
        total = None
        for start in range(0, max(1, longest), width):
            x, y, mask = self._gather(chunk, [b[start : start + width] for b in batches], width)
            part = self._run_step(params, frozen, x, y, mask, max_norm, shared)
            total = part if total is None else _add(total, part)
        return total

    def _run_step(
        self,
        params: dict[str, Tensor],
        frozen: dict[str, Tensor],
        x: Tensor,
        y: Tensor,
        mask: Tensor,
        norm: Tensor,
        shared: bool = False,
    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        if self.clients_at_once:
            return self._step(params, frozen, x, y, mask, norm)
        # records of several clients share a pass only where each record is its own forward (vmap): a forward
        # through the layers sees the whole pass and could mix one client's records into another's gradients
        if shared and self.rules is None and self.privacy.enabled and not self.width and bool(mask.any()):
            return self._shared_sums({n: p[0] for n, p in params.items()}, frozen, x, y, mask, norm)
        # eager steps take each client's real records alone; compiled ones keep the static width
        lengths = [len(m) for m in mask] if self.width else mask.sum(1).clamp(min=1).int().tolist()
        rows = [
            self._step({n: p[c] for n, p in params.items()}, frozen, x[c, :n], y[c, :n], mask[c, :n], norm[c])
            for c, n in enumerate(lengths)
        ]
        grads = {n: torch.stack([r[0][n] for r in rows]) for n in rows[0][0]}
        return grads, torch.stack([r[1] for r in rows]), torch.stack([r[2] for r in rows])

    def _shared_sums(
        self, params: dict[str, Tensor], frozen: dict[str, Tensor], x: Tensor, y: Tensor, mask: Tensor, norm: Tensor
    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """The clients' clipped sums when they all hold the same ``params`` (one client's): every real record's
        gradient in passes of up to ``SHARED_PASS`` records across clients (fewer, larger passes than one per
        client), each record clipped at its client's norm and added to its client's sum."""
        real = mask.bool()
        xs, ys = x[real], y[real]
        owner = torch.arange(len(mask), device=self.device)[:, None].expand_as(mask)[real]
        size = max(1, min(SHARED_PASS, self._records_in_memory()))
        total = None
        for i in range(0, len(xs), size):
            grads, losses, correct = self._example_grads(params, frozen, xs[i : i + size], ys[i : i + size])
            client = owner[i : i + size]
            part = (
                clip_and_sum_by_client(grads, client, len(mask), norm),
                losses.new_zeros(len(mask)).index_add_(0, client, losses),
                correct.new_zeros(len(mask)).index_add_(0, client, correct),
            )
            total = part if total is None else _add(total, part)
        return total

    def _with_canaries(self, chunk: list[ClientState], active: list[bool], summed: dict[str, Tensor]) -> dict:
        """An audit's sampled Dirac canaries added to their client's sum: clipped at the client's norm as its
        records are (unclipped without DP)."""
        summed = dict(summed)
        for c, client in enumerate(chunk):
            canaries = client.canaries
            if not active[c] or canaries is None:
                continue
            included = canaries.sample(client.sample_rate)
            like = {n: summed[n][c] for n in canaries.shapes}
            if self.privacy.enabled:
                rows = {n: g[None] for n, g in canaries.per_example(included, like).items()}
                mask = torch.ones((1, len(included)), device=self.device)
                added = {
                    n: g[0] for n, g in clip_and_sum(rows, mask, self._per_client([client], "max_grad_norm")).items()
                }
            else:
                added = canaries.summed(included, like)
            for name, canary_sum in added.items():
                summed[name] = summed[name].clone()
                summed[name][c] += canary_sum
        return summed

    def _per_client(self, chunk: list[ClientState], attribute: str) -> Tensor:
        return torch.tensor([float(getattr(c, attribute)) for c in chunk], device=self.device)

    def _gather(self, chunk: list[ClientState], batches: list[list[int]], width: int) -> tuple[Tensor, Tensor, Tensor]:
        """The chunk's batches padded to ``width`` (padding repeats a client's first record, masked out)."""
        rows = []
        for client, batch in zip(chunk, batches):
            offset = self.offsets[client.name]
            rows.append([offset + i for i in batch] + [offset] * (width - len(batch)))
        index = torch.tensor(rows, device=self.device)
        lengths = torch.tensor([len(b) for b in batches], device=self.device)
        mask = (torch.arange(width, device=self.device) < lengths[:, None]).float()
        return self.inputs[index], self.targets[index], mask

    def _batch_mean(self, grads: dict[str, Tensor], sizes: Tensor) -> dict[str, Tensor]:
        """Without DP: the batch's summed gradient as the module's loss would give it (mean or sum)."""
        if self.privacy.loss_reduction != "mean":
            return grads
        sizes = sizes.clamp(min=1)
        return {name: g / sizes.view(-1, *[1] * (g.dim() - 1)) for name, g in grads.items()}

    def _noised(
        self, chunk: list[ClientState], active: list[bool], summed: dict[str, Tensor], batch: Tensor
    ) -> dict[str, Tensor]:
        """Opacus's noise (from each client's own stream, parameter by parameter in its order) on each active
        client's clipped sum, scaled for the loss reduction; inactive clients' rows are left as they are."""
        out = {}
        for name in self.trained:
            rows = list(summed[name].unbind(0))
            for c, client in enumerate(chunk):
                if active[c]:
                    std = client.noise_multiplier * client.max_grad_norm
                    rows[c] = rows[c] + gaussian_noise(std, rows[c], client.noise_rng, self.privacy.secure_mode)
            out[name] = torch.stack(rows)
        if self.privacy.loss_reduction == "mean":  # Opacus divides by the expected batch size
            return self._batch_mean(out, batch)
        return out


def static_width(batch_size: int, poisson: bool) -> int:
    """The padded width of a compiled batch: the batch size, or under Poisson sampling its expected size plus
    ``POISSON_SPREAD`` standard deviations, rounded up to a multiple of 8."""
    if not poisson:
        return batch_size
    return 8 * math.ceil((batch_size + POISSON_SPREAD * math.sqrt(batch_size)) / 8)


def _add(total: tuple, part: tuple) -> tuple:
    """Adds two ``(gradient sums, loss sums, correct counts)``."""
    return {n: total[0][n] + part[0][n] for n in part[0]}, total[1] + part[1], total[2] + part[2]


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""
