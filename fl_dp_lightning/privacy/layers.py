"""Layers DP-SGD cannot train, and their replacements.

BatchNorm normalises each record with statistics of its batch peers (so one record moves the others' gradients),
and in-place activations break Opacus's per-sample-gradient hooks. The strategy refuses them by default, naming
each layer once, or replaces them in place under ``privacy.fix_modules``; replacing a normalisation changes the
model, so every replacement is logged with a warning.
"""

from __future__ import annotations

import re

from opacus.validators import ModuleValidator
from torch import nn

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def in_place_layers(module: nn.Module) -> list[str]:
    """Names of the submodules set to work in place (``nn.ReLU(inplace=True)`` and the like)."""
    return [name for name, layer in module.named_modules() if getattr(layer, "inplace", False) is True]


def unsupported_layers(module: nn.Module) -> str | None:
    """A one-line description of the layers DP-SGD cannot train (each layer once, each reason once), or None."""
    names = [
        f"{name} ({type(layer).__name__})"
        for name, layer in module.named_modules()
        if type(layer) in ModuleValidator.VALIDATORS and ModuleValidator.VALIDATORS[type(layer)](layer)
    ]
    reasons = dict.fromkeys(_first_sentence(str(e)) for e in ModuleValidator.validate(module, strict=False))
    in_place = in_place_layers(module)
    if in_place:
        names += [f"{name} (in place)" for name in in_place]
        reasons["in-place layers break the per-sample gradient hooks."] = None
    if not names and not reasons:
        return None
    return f"{', '.join(names)}: {' '.join(reasons)}"


def _first_sentence(text: str) -> str:
    match = re.match(r"(.+?\.)(\s|$)", " ".join(text.split()))
    return match.group(1) if match else " ".join(text.split())


def norm_replacement(layer: nn.Module, choice: str) -> nn.Module:
    """What replaces a BatchNorm layer.

    Args:
        layer: the BatchNorm layer.
        choice: ``layernorm`` (GroupNorm(1, C): each record normalised over all its channels), ``groupnorm``
            (GroupNorm with the largest group count <= 32 that divides C), ``identity`` (no normalisation),
            or ``auto``: ``layernorm`` for BatchNorm1d (features without spatial axes, where small groups
            normalise away the signal), ``groupnorm`` for 2-D and 3-D BatchNorm.
    """
    channels, affine = layer.num_features, layer.affine
    if choice == "auto":
        choice = "layernorm" if isinstance(layer, nn.BatchNorm1d) else "groupnorm"
    if choice == "identity":
        return nn.Identity()
    groups = 1 if choice == "layernorm" else max(g for g in range(1, 33) if channels % g == 0)
    return nn.GroupNorm(groups, channels, affine=affine)


def fix_layers(module: nn.Module, norm: str = "auto") -> list[str]:
    """Replaces, in place, BatchNorm (see :func:`norm_replacement`) and every other layer Opacus has a fixer for,
    and turns in-place activations off. Returns one line per change."""
    changes = []
    for name in in_place_layers(module):
        module.get_submodule(name).inplace = False
        changes.append(f"{name} no longer works in place")
    for name, layer in list(module.named_modules()):
        fixer = ModuleValidator.FIXERS.get(type(layer))
        if fixer is None or not name:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        replacement = norm_replacement(layer, norm) if isinstance(layer, BATCH_NORMS) else fixer(layer)
        setattr(parent, child, replacement)
        changes.append(f"replaced {name} ({type(layer).__name__}) with {replacement}")
    return changes
