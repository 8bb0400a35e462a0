"""The sensitivity probe: before any training, check that DP-SGD's clipped sum really bounds each record.

DP-SGD's guarantee needs every record to change the clipped sum by at most ``max_grad_norm``. That holds only if
each per-example gradient depends on its own record alone, covers the whole gradient of the loss, and is scaled as
``privacy.loss_reduction`` says. Modules can break this silently (a loss over the batch, mixup with an in-batch
partner, records folded into the batch axis, a regularizer written into the loss, a mismatched reduction, buffers
updated from the data, a hidden state carried from one batch, and so from one client, into the next). The probe
runs the module's own ``training_step`` on batches shaped like the client's: at the clients' real expected batch
sizes and at the upper tail of a Poisson batch, with records drawn from public data (the shared test set: the
data's scale and classes) where there is one, else random records; it calls ``training_step`` several times on
the same batch and compares, with one record removed, what must not change.

What it cannot see: a module whose mixing depends on something none of its batches show (a record value no
public record has, a batch size far outside the Poisson tail, a call count past the probe's). Such a module is
the user's responsibility; the empirical audit measures what a run really releases.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from fl_dp_lightning.config import ConfigError

POISSON_SPREAD = 4
"""Standard deviations above its mean at which a Poisson batch's size is taken as its upper tail."""

PROBE_SEED = 0
"""Seed of the random numbers each of the probe's calls draws (mixup partners, augmentation)."""

RTOL, ATOL = 1e-3, 1e-5
"""Tolerance of the probe's comparisons (float32 sums in different orders)."""


class SensitivityError(ConfigError):
    """The module breaks per-example sensitivity; the message names the cause and the fix."""


def poisson_upper(batch_size: int) -> int:
    """The size a Poisson batch of expected size ``batch_size`` stays below in practice (mean + 4 sd)."""
    return batch_size + math.ceil(POISSON_SPREAD * math.sqrt(batch_size))


def probe_sizes(batch_sizes: Sequence[int]) -> list[int]:
    """The batch sizes the probe runs: the smallest and largest expected client batch, and the largest one's
    Poisson upper tail (at least two records each, so that one can be removed)."""
    low, high = max(2, min(batch_sizes)), max(2, max(batch_sizes))
    return sorted({low, high, poisson_upper(high)})


def random_batch_like(template: Any, size: int, generator: torch.Generator, num_classes: int | None = None) -> Any:
    """A batch of ``size`` random records with the structure of ``template`` (a zero-row batch).

    Floating-point tensors get standard normal values (the scale of normalised data); integer tensors (labels)
    values in ``[0, num_classes)`` (``{0, 1}`` when the classes are unknown).
    """
    if isinstance(template, Tensor):
        shape = (size, *template.shape[1:])
        if template.is_floating_point():
            return torch.randn(shape, generator=generator, dtype=template.dtype).to(template.device)
        if template.dtype == torch.bool:
            return (torch.rand(shape, generator=generator) < 0.5).to(template.device)
        high = num_classes or 2
        return torch.randint(0, high, shape, generator=generator, dtype=template.dtype).to(template.device)
    if isinstance(template, dict):
        return {k: random_batch_like(v, size, generator, num_classes) for k, v in template.items()}
    if isinstance(template, (list, tuple)):
        return type(template)(random_batch_like(v, size, generator, num_classes) for v in template)
    return template


def drop_record(batch: Any, index: int) -> Any:
    """``batch`` without its record ``index`` (every tensor loses that row)."""
    if isinstance(batch, Tensor):
        return torch.cat([batch[:index], batch[index + 1 :]])
    if isinstance(batch, dict):
        return {k: drop_record(v, index) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(drop_record(v, index) for v in batch)
    return batch


def loss_of(output: Any) -> Tensor | None:
    """The loss in a ``training_step`` output (a tensor, or the ``"loss"`` entry of a dict)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):
        return output.get("loss")
    return None


def tensor_attributes(module: nn.Module) -> dict[str, Tensor]:
    """Copies of the tensors a module and its layers hold as plain attributes (not parameters or buffers), also
    inside tuples and lists: where a hidden state or a cache lives between calls."""
    found = {}
    for prefix, layer in module.named_modules():
        for key, value in vars(layer).items():
            if key.startswith("_") or key == "activations":  # torch's own slots; Opacus's per-layer scratch list
                continue
            values = value if isinstance(value, (tuple, list)) else (value,)
            for i, item in enumerate(values):
                if isinstance(item, Tensor):
                    name = f"{prefix}.{key}" if prefix else key
                    found[name if len(values) == 1 else f"{name}[{i}]"] = item.detach().clone()
    return found


def changed_attributes(before: dict[str, Tensor], after: dict[str, Tensor]) -> list[str]:
    """The attribute tensors that appeared, vanished or changed between two :func:`tensor_attributes`."""
    names = sorted(set(before) | set(after))
    return [
        n
        for n in names
        if n not in before
        or n not in after
        or before[n].shape != after[n].shape
        or not torch.equal(before[n], after[n])
    ]


@contextmanager
def _probing(module: nn.Module) -> Iterator[None]:
    """Runs the probe without a trace: the weights, buffers and RNG come back as they were; dropout is off."""
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
    attributes = {
        (layer, key): value
        for layer in module.modules()
        for key, value in vars(layer).items()
        if not key.startswith("_")
    }
    dropouts = [m for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.training]
    for m in dropouts:
        m.eval()  # dropout is per element, so it mixes no records; off, two passes are comparable
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for m in dropouts:
            m.train()
        module.load_state_dict(saved)
        for (layer, key), value in attributes.items():  # a hidden state the probe's calls left behind
            setattr(layer, key, value)
        for p in module.parameters():
            p.grad, p.grad_sample, p.summed_grad = None, None, None
        for m in module.modules():
            reset = getattr(m, "reset", None)
            if callable(reset) and type(m).__module__.startswith("torchmetrics"):
                reset()  # the probe's random records must not count in the user's training metrics


Gradients = dict[str, Tensor | None]


def _gradients(step: Callable[[Any], Any], params: dict[str, nn.Parameter], batch: Any) -> tuple[Gradients, Gradients]:
    """Per-example gradients and the module's own gradient of ``step(batch)``'s loss; every call draws the same
    random numbers, so that two calls differ only by what the module carries from one to the next."""
    for p in params.values():
        p.grad, p.grad_sample = None, None
    torch.manual_seed(PROBE_SEED)  # inside the probe's forked RNG: the user's stream is left as it was
    loss = loss_of(step(batch))
    if loss is None:
        raise SensitivityError(
            "training_step returned no loss on the probe batch; return the loss (or {'loss': ...}) from training_step"
        )
    loss.backward()
    samples = {n: None if p.grad_sample is None else p.grad_sample.detach().double() for n, p in params.items()}
    grads = {n: None if p.grad is None else p.grad.detach().double() for n, p in params.items()}
    return samples, grads


def _close(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=RTOL, atol=ATOL * max(1.0, float(b.abs().max())))


def _same(a: Gradients, b: Gradients) -> bool:
    return all((a[n] is None) == (b[n] is None) and (a[n] is None or _close(b[n], a[n])) for n in a)


def check_sensitivity(
    module: nn.Module,
    step: Callable[[Any], Any],
    make_batch: Callable[[int], Any],
    *,
    sizes: Sequence[int],
    loss_reduction: str,
) -> None:
    """Refuses modules whose clipped per-example gradients would not bound each record's influence.

    Args:
        module: the module with Opacus's per-sample-gradient hooks attached (``GradSampleModule`` over it).
        step: runs the module's ``training_step`` on a batch and returns its output.
        make_batch: a batch of the given number of records shaped like the client's (public or random records).
        sizes: the batch sizes to probe (:func:`probe_sizes`).
        loss_reduction: ``privacy.loss_reduction``.

    Raises:
        SensitivityError: naming the cause and the fix.
    """
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    buffers_before = {n: b.detach().clone() for n, b in module.named_buffers() if b.is_floating_point()}
    with _probing(module):
        first = make_batch(sizes[0])
        reference, grads = _gradients(step, params, first)
        changed = [
            n for n, b in module.named_buffers() if n in buffers_before and not torch.equal(b, buffers_before[n])
        ]
        if changed:
            raise SensitivityError(
                f"buffers {changed} change during training_step: they are computed from private records and would "
                "leave the client without noise. Fix: compute them from public data or keep them constant; for "
                "BatchNorm's running statistics set privacy.fix_modules=true (GroupNorm)"
            )
        held = tensor_attributes(module)
        _check_stateless(module, held, reference, _gradients(step, params, first)[0], 2)
        for size in sizes:
            full, (samples, grads) = (
                (first, (reference, grads)) if size == sizes[0] else _probe(step, params, make_batch, size)
            )
            _check_coverage(samples, grads, size)
            _check_sum(samples, grads, size, loss_reduction)
            removed = size // 2
            fewer, _ = _gradients(step, params, drop_record(full, removed))
            _check_independence(samples, fewer, removed, size, loss_reduction)
        calls = 3 + 2 * len(sizes) - 1
        _check_stateless(module, held, reference, _gradients(step, params, first)[0], calls)


def _probe(step: Callable[[Any], Any], params: dict[str, nn.Parameter], make_batch: Callable[[int], Any], size: int):
    batch = make_batch(size)
    return batch, _gradients(step, params, batch)


def _check_stateless(module: nn.Module, held: dict[str, Tensor], first: Gradients, again: Gradients, call: int) -> None:
    """Refuses a module whose later call on the same batch gives other per-example gradients: it keeps state across
    calls (a hidden state, a cache, a counter), which carries one batch's records, and one client's, into the next."""
    if _same(first, again):
        return
    names = changed_attributes(held, tensor_attributes(module))
    where = f" in {names}" if names else ""
    raise SensitivityError(
        f"training_step gave other per-example gradients for the same batch on call {call}: the module keeps state "
        f"across calls{where} (a hidden state, a cache or a counter), which carries one batch's records, and one "
        "client's, into the next. Fix: compute each step from its batch alone (for a recurrent model, start the "
        "hidden state anew in every training_step, e.g. self.hidden = None before the forward)"
    )


def _check_coverage(samples: Gradients, grads: Gradients, size: int) -> None:
    for name, sample in samples.items():
        if sample is None and grads[name] is not None:
            raise SensitivityError(
                f"parameter {name} gets a gradient but no per-example gradient (it is used outside a layer Opacus "
                "hooks): DP-SGD would drop its gradient. Fix: use it only inside supported layers (nn.Linear, ...)"
            )
        if sample is not None and sample.shape[0] != size:
            raise SensitivityError(
                f"parameter {name} has {sample.shape[0]} per-example gradients for a batch of {size} records: "
                "the forward folds records into the batch axis (e.g. x.reshape(B * T, d)), so one record counts as "
                "several. Fix: keep the batch axis first and separate (reshape to (B, T, d); layers accept extra axes)"
            )


def _check_sum(samples: Gradients, grads: Gradients, size: int, loss_reduction: str) -> None:
    for name, sample in samples.items():
        if sample is None:
            continue
        summed = sample.sum(0) / (size if loss_reduction == "mean" else 1)
        if not _close(summed, grads[name]):
            raise SensitivityError(
                f"the gradient of {name} differs from the sum of its per-example gradients at a batch of {size}: the "
                "loss has a term that depends on the parameters alone (a regularizer such as weight decay or a "
                "proximal term) or on the batch as a whole, which DP-SGD's per-example gradients never see. Fix: "
                "move a regularizer into the optimizer (e.g. torch.optim.SGD(..., weight_decay=...)); for FedProx's "
                "term set client.proximal_mu (FederatedDPStrategy(proximal_mu=...))"
            )


def _check_independence(full: Gradients, fewer: Gradients, removed: int, size: int, loss_reduction: str) -> None:
    keep = [i for i in range(size) if i != removed]
    for name, sample in full.items():
        if sample is None:
            continue
        before, after = sample[keep], fewer[name]
        if _close(after, before):
            continue
        other = "sum" if loss_reduction == "mean" else "mean"
        ratio = (size - 1) / size if loss_reduction == "mean" else size / (size - 1)
        if _close(after, before * ratio):
            raise SensitivityError(
                f"the loss reduces over the batch by {other}, but privacy.loss_reduction={loss_reduction!r}: each "
                f"record's clipped gradient would depend on the batch size. Fix: set privacy.loss_reduction={other}"
            )
        raise SensitivityError(
            f"removing one record of a batch of {size} changed the other records' per-example gradients of {name}: "
            "the module mixes records of a batch (batch statistics, a loss over the whole batch, mixup with an "
            "in-batch partner), so one record can move the clipped sum by more than max_grad_norm. Fix: compute "
            "each record's loss from that record alone (mix only within a record, normalise per record, e.g. "
            "GroupNorm/LayerNorm)"
        )
