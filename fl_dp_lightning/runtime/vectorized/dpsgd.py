"""DP-SGD's step for many clients at once, as pure functions over stacked tensors.

Shapes: ``C`` clients, each with a batch padded to ``P`` records; a mask marks the real records (1) and the padding
(0). Per-example gradients are ``[C, P, *param.shape]``. The arithmetic is Opacus's (``DPOptimizer``): each
example's gradient is scaled by ``min(1, S / (||g|| + 1e-6))`` and the scaled gradients summed; padding contributes
exactly zero, so a padded batch gives the same sum as the unpadded one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

PerExampleLoss = Callable[[Tensor, Tensor], Tensor]
"""``loss(output, target)`` -> one loss per example (shape ``[batch]``)."""


def _mse(output: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(output, target, reduction="none").flatten(1).mean(1)


def _bce_with_logits(output: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(output, target, reduction="none").flatten(1).mean(1)


def _cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(output, target, reduction="none")


def _nll(output: Tensor, target: Tensor) -> Tensor:
    return F.nll_loss(output, target, reduction="none")


LOSSES: dict[str, PerExampleLoss] = {
    "cross_entropy": _cross_entropy,
    "nll": _nll,
    "mse": _mse,
    "bce_with_logits": _bce_with_logits,
}
"""Per-example losses by name; each is the per-example term of the batch-mean loss of the same name in torch."""
CLASSIFICATION_LOSSES = ("cross_entropy", "nll")
"""Losses whose output is per-class scores, so that accuracy (argmax equals target) is defined."""


def per_example_norms(grads: Mapping[str, Tensor]) -> Tensor:
    """The L2 norm of each example's whole gradient (over all parameters): ``[C, P]``."""
    return torch.stack([g.flatten(2).norm(2, dim=-1) for g in grads.values()], dim=-1).norm(2, dim=-1)


def clip_and_sum(grads: Mapping[str, Tensor], mask: Tensor, max_grad_norm: Tensor) -> dict[str, Tensor]:
    """Each client's sum of its real records' gradients, each clipped to that client's ``max_grad_norm``.

    Args:
        grads: per-example gradients by parameter name, ``[C, P, *shape]``.
        mask: ``[C, P]``, 1 for a real record and 0 for padding.
        max_grad_norm: ``[C]``, each client's clip norm S.

    Returns:
        ``[C, *shape]`` per parameter.
    """
    factor = clip_factors(per_example_norms(grads), max_grad_norm[:, None]) * mask
    return {name: torch.einsum("cp,cp...->c...", factor.to(g.dtype), g) for name, g in grads.items()}


def clip_and_sum_by_client(
    grads: Mapping[str, Tensor], client: Tensor, clients: int, max_grad_norm: Tensor
) -> dict[str, Tensor]:
    """:func:`clip_and_sum` for the records of several clients in one unpadded batch.

    Args:
        grads: per-example gradients by parameter name, ``[n, *shape]``.
        client: ``[n]``, the index of each record's client.
        clients: how many clients there are.
        max_grad_norm: ``[clients]``, each client's clip norm S.

    Returns:
        ``[clients, *shape]`` per parameter.
    """
    factor = clip_factors(per_example_norms({n: g[None] for n, g in grads.items()})[0], max_grad_norm[client])
    return {
        name: g.new_zeros((clients, *g.shape[1:])).index_add_(0, client, g * factor.view(-1, *[1] * (g.dim() - 1)))
        for name, g in grads.items()
    }


def clip_factors(norms: Tensor, max_grad_norm: Tensor) -> Tensor:
    """Opacus's clipping factor of each example: ``min(1, S / (||g|| + 1e-6))``."""
    return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)


def sgd_step(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """One step of ``torch.optim.SGD`` (same arguments), out of place: the new parameter and momentum buffer."""
    if maximize:
        grad = -grad
    if weight_decay:
        grad = grad + weight_decay * param
    if momentum:
        momentum_buffer = (
            grad.clone() if momentum_buffer is None else momentum * momentum_buffer + (1 - dampening) * grad
        )
        grad = grad + momentum * momentum_buffer if nesterov else momentum_buffer
    return param - lr * grad, momentum_buffer


def gaussian_noise(std: float, like: Tensor, generator: torch.Generator | None, secure_mode: bool) -> Tensor:
    """DP-SGD's noise for a sum shaped like ``like``: N(0, std^2) per coordinate, drawn from ``generator`` as
    Opacus's ``DPOptimizer`` draws it (the same stream gives the same noise under both engines). ``secure_mode``
    sums four draws over two, after one discarded (Opacus's defence against floating-point attacks, Mironov 2012)."""
    if std == 0:
        return torch.zeros_like(like)
    if not secure_mode:
        return torch.normal(0, std, like.shape, device=like.device, generator=generator, dtype=like.dtype)
    torch.normal(0, std, (1, 1), device=like.device, generator=generator)  # discarded, as Opacus does
    total = torch.zeros(like.shape, device=like.device, dtype=like.dtype)
    for _ in range(4):
        total += torch.normal(0, std, like.shape, device=like.device, generator=generator)
    return total / 2
