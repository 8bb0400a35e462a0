"""Layers DP-SGD cannot train, and their replacements.

BatchNorm normalises each record with statistics of its batch peers (so one record moves the others' gradients),
nn.LSTM, nn.GRU and nn.MultiheadAttention hide their weights from Opacus's hooks, and in-place operations (an
activation's ``inplace=True``, torchvision ResNet's ``out += identity``) break them. The strategy refuses such
layers by default, naming each layer once, or replaces them in place under ``privacy.fix_modules`` as Opacus's
``ModuleValidator.fix`` does, keeping frozen layers frozen and pretrained affine weights; replacing a
normalisation changes the model, so every replacement is logged with a warning.
"""

from __future__ import annotations

import re

import torch
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class OutOfPlaceBasicBlock(BasicBlock):
    """torchvision's ResNet block with its residual added out of place (the stock ``out += identity`` breaks
    Opacus's per-sample-gradient hooks); the same weights, the same function."""

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class OutOfPlaceBottleneck(Bottleneck):
    """torchvision's ResNet-50/101/152 block with its residual added out of place."""

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


OUT_OF_PLACE_BLOCKS = {BasicBlock: OutOfPlaceBasicBlock, Bottleneck: OutOfPlaceBottleneck}
"""torchvision blocks whose forward adds in place, and their out-of-place twins."""

RECURRENT = {nn.LSTM: "DPLSTM", nn.GRU: "DPGRU", nn.RNN: "DPRNN", nn.MultiheadAttention: "DPMultiheadAttention"}
"""Layers whose weights Opacus's hooks cannot see, and the Opacus layer ``fix_modules`` puts in their place."""


def fixes_for(module: nn.Module) -> str:
    """What ``privacy.fix_modules`` would do to ``module``'s unsupported layers, in a few words each."""
    kinds = {type(layer) for layer in module.modules()}
    fixes = [f"{kind.__name__} becomes Opacus's {name}" for kind, name in RECURRENT.items() if kind in kinds]
    if kinds & set(BATCH_NORMS):
        fixes.append("BatchNorm becomes GroupNorm, see privacy.fix_norm")
    if kinds & {nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d}:
        fixes.append("InstanceNorm keeps no running statistics")
    if in_place_layers(module) or kinds & set(OUT_OF_PLACE_BLOCKS):
        fixes.append("in-place operations work out of place")
    return "; ".join(fixes)


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
    turns in-place activations off and torchvision's in-place residuals out of place. A replacement keeps what it
    can of the layer: its affine weights and whether they train. Returns one line per change."""
    changes = []
    for name in in_place_layers(module):
        module.get_submodule(name).inplace = False
        changes.append(f"{name} no longer works in place")
    for name, layer in module.named_modules():
        if type(layer) in OUT_OF_PLACE_BLOCKS:
            layer.__class__ = OUT_OF_PLACE_BLOCKS[type(layer)]  # the same weights; only forward differs
            changes.append(f"{name or 'the module'} adds its residual out of place")
    for name, layer in list(module.named_modules()):
        fixer = ModuleValidator.FIXERS.get(type(layer))
        if fixer is None or not name:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        replacement = norm_replacement(layer, norm) if isinstance(layer, BATCH_NORMS) else fixer(layer)
        kept = _carry_over(layer, replacement)
        setattr(parent, child, replacement)
        changes.append(f"replaced {name} ({type(layer).__name__}) with {_short(replacement)}{kept}")
    return changes


SHOWN_CHANGES = 4
"""Up to this many changes a warning lists them all; beyond, it counts them by kind."""


def describe_changes(changes: list[str]) -> str:
    """The changes of :func:`fix_layers` for one warning: each, when few; else counted by kind, with an example
    of each replacement's kind (every change goes to the log as well)."""
    if len(changes) <= SHOWN_CHANGES:
        return "; ".join(changes)
    replaced = [c for c in changes if c.startswith("replaced ")]
    residual = sum(c.endswith("adds its residual out of place") for c in changes)
    in_place = sum(c.endswith("no longer works in place") for c in changes)
    kinds = {}  # "BatchNorm2d -> GroupNorm, its affine weights kept, frozen as it was": count
    for change in replaced:
        old, new = change.split(" (", 1)[1].split(") with ", 1)
        kind = f"{old} replaced by {new.split('(', 1)[0]}{new[new.find(', its') :] if ', its' in new else ''}"
        kinds[kind] = kinds.get(kind, 0) + 1
    parts = [f"{n} {kind}" for kind, n in kinds.items()]
    parts += [f"{residual} residual blocks add out of place"] * bool(residual)
    parts += [f"{in_place} activations no longer in place"] * bool(in_place)
    return f"{len(changes)} changes: " + "; ".join(parts) + " (each in the log)"


def _carry_over(layer: nn.Module, replacement: nn.Module) -> str:
    """Copies a normalisation's affine weights into its replacement when their shapes agree, and freezes the
    replacement's parameters if the layer's were frozen; says what it kept."""
    old, new = dict(layer.named_parameters()), dict(replacement.named_parameters())
    kept = ""
    if {"weight", "bias"} <= old.keys() & new.keys() and all(old[k].shape == new[k].shape for k in ("weight", "bias")):
        with torch.no_grad():
            new["weight"].copy_(old["weight"])
            new["bias"].copy_(old["bias"])
        kept = ", its affine weights kept"
    if old and not any(p.requires_grad for p in old.values()):
        for p in new.values():
            p.requires_grad_(False)
        kept += ", frozen as it was"
    return kept


def _short(layer: nn.Module) -> str:
    """A layer's one-line repr, or its class name where the repr runs over several lines."""
    text = repr(layer)
    return text if "\n" not in text else type(layer).__name__
