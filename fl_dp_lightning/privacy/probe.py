"""The sensitivity probe: before any training, check that DP-SGD's clipped sum really bounds each record.

DP-SGD's guarantee needs every record to change the clipped sum by at most ``max_grad_norm``. That holds only if
each per-example gradient depends on its own record alone, covers the whole gradient of the loss, and is scaled as
``privacy.loss_reduction`` says. Modules can break this silently (a loss over the batch, mixup with an in-batch
partner, records folded into the batch axis, a regularizer written into the loss, a mismatched reduction, buffers
updated from the data). The probe runs the module's own ``training_step`` on a small random batch shaped like
the client's records (only their shapes and types are used) and compares, with one record removed, what must not change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from fl_dp_lightning.config import ConfigError

PROBE_BATCH = 6
"""Records in the probe batch."""

RTOL, ATOL = 1e-3, 1e-5
"""Tolerance of the probe's comparisons (float32 sums in different orders)."""


class SensitivityError(ConfigError):
    """The module breaks per-example sensitivity; the message names the cause and the fix."""


def random_batch_like(template: Any, size: int, generator: torch.Generator) -> Any:
    """A batch of ``size`` random records with the structure of ``template`` (a zero-row batch).

    Floating-point tensors get standard normal values; integer tensors (labels, token ids) values in {0, 1}.
    """
    if isinstance(template, Tensor):
        shape = (size, *template.shape[1:])
        if template.is_floating_point():
            return torch.randn(shape, generator=generator, dtype=template.dtype).to(template.device)
        if template.dtype == torch.bool:
            return (torch.rand(shape, generator=generator) < 0.5).to(template.device)
        return torch.randint(0, 2, shape, generator=generator, dtype=template.dtype).to(template.device)
    if isinstance(template, dict):
        return {k: random_batch_like(v, size, generator) for k, v in template.items()}
    if isinstance(template, (list, tuple)):
        return type(template)(random_batch_like(v, size, generator) for v in template)
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


@contextmanager
def _probing(module: nn.Module) -> Iterator[None]:
    """Runs the probe without a trace: the weights, buffers and RNG come back as they were; dropout is off."""
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
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
        for p in module.parameters():
            p.grad, p.grad_sample, p.summed_grad = None, None, None
        for m in module.modules():
            reset = getattr(m, "reset", None)
            if callable(reset) and type(m).__module__.startswith("torchmetrics"):
                reset()  # the probe's random records must not count in the user's training metrics


def _gradients(
    step: Callable[[Any], Any], params: dict[str, nn.Parameter], batch: Any
) -> tuple[dict[str, Tensor | None], dict[str, Tensor | None]]:
    """Per-example gradients and the module's own gradient of ``step(batch)``'s loss."""
    for p in params.values():
        p.grad, p.grad_sample = None, None
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
    return torch.allclose(a, b, rtol=RTOL, atol=ATOL * max(1.0, float(b.abs().max())))


def check_sensitivity(
    module: nn.Module,
    step: Callable[[Any], Any],
    template: Any,
    *,
    loss_reduction: str,
) -> None:
    """Refuses modules whose clipped per-example gradients would not bound each record's influence.

    Args:
        module: the module with Opacus's per-sample-gradient hooks attached (``GradSampleModule`` over it).
        step: runs the module's ``training_step`` on a batch and returns its output.
        template: a zero-row batch with the structure of the client's batches.
        loss_reduction: ``privacy.loss_reduction``.

    Raises:
        SensitivityError: naming the cause and the fix.
    """
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    buffers_before = {n: b.detach().clone() for n, b in module.named_buffers() if b.is_floating_point()}
    with _probing(module):
        generator = torch.Generator().manual_seed(0)
        full = random_batch_like(template, PROBE_BATCH, generator)
        samples, grads = _gradients(step, params, full)
        changed = [
            n for n, b in module.named_buffers() if n in buffers_before and not torch.equal(b, buffers_before[n])
        ]
        if changed:
            raise SensitivityError(
                f"buffers {changed} change during training_step: they are computed from private records and would "
                "leave the client without noise. Fix: compute them from public data or keep them constant; for "
                "BatchNorm's running statistics set privacy.fix_modules=true (GroupNorm)"
            )
        _check_coverage(samples, grads)
        _check_sum(samples, grads, loss_reduction)
        removed = PROBE_BATCH // 2
        fewer, _ = _gradients(step, params, drop_record(full, removed))
        _check_independence(samples, fewer, removed, loss_reduction)


def _check_coverage(samples: dict[str, Tensor | None], grads: dict[str, Tensor | None]) -> None:
    for name, sample in samples.items():
        if sample is None and grads[name] is not None:
            raise SensitivityError(
                f"parameter {name} gets a gradient but no per-example gradient (it is used outside a layer Opacus "
                "hooks): DP-SGD would drop its gradient. Fix: use it only inside supported layers (nn.Linear, ...)"
            )
        if sample is not None and sample.shape[0] != PROBE_BATCH:
            raise SensitivityError(
                f"parameter {name} has {sample.shape[0]} per-example gradients for a batch of {PROBE_BATCH} records: "
                "the forward folds records into the batch axis (e.g. x.reshape(B * T, d)), so one record counts as "
                "several. Fix: keep the batch axis first and separate (reshape to (B, T, d); layers accept extra axes)"
            )


def _check_sum(samples: dict[str, Tensor | None], grads: dict[str, Tensor | None], loss_reduction: str) -> None:
    for name, sample in samples.items():
        if sample is None:
            continue
        summed = sample.sum(0) / (PROBE_BATCH if loss_reduction == "mean" else 1)
        if not _close(summed, grads[name]):
            raise SensitivityError(
                f"the gradient of {name} differs from the sum of its per-example gradients: the loss has a term "
                "that depends on the parameters alone (a regularizer such as weight decay or a proximal term), "
                "which DP-SGD's per-example gradients never see. Fix: move it into the optimizer "
                "(e.g. torch.optim.SGD(..., weight_decay=...)); for FedProx's term set client.proximal_mu "
                "(FederatedDPStrategy(proximal_mu=...))"
            )


def _check_independence(
    full: dict[str, Tensor | None], fewer: dict[str, Tensor | None], removed: int, loss_reduction: str
) -> None:
    keep = [i for i in range(PROBE_BATCH) if i != removed]
    for name, sample in full.items():
        if sample is None:
            continue
        before, after = sample[keep], fewer[name]
        if _close(after, before):
            continue
        other = "sum" if loss_reduction == "mean" else "mean"
        ratio = (PROBE_BATCH - 1) / PROBE_BATCH if loss_reduction == "mean" else PROBE_BATCH / (PROBE_BATCH - 1)
        if _close(after, before * ratio):
            raise SensitivityError(
                f"the loss reduces over the batch by {other}, but privacy.loss_reduction={loss_reduction!r}: each "
                f"record's clipped gradient would depend on the batch size. Fix: set privacy.loss_reduction={other}"
            )
        raise SensitivityError(
            f"removing one record changed the other records' per-example gradients of {name}: the module mixes "
            "records of a batch (batch statistics, a loss over the whole batch, mixup with an in-batch partner), so "
            "one record can move the clipped sum by more than max_grad_norm. Fix: compute each record's loss from "
            "that record alone (mix only within a record, normalise per record, e.g. GroupNorm/LayerNorm)"
        )
