"""privacy.fix_modules on torchvision's ResNets: what the warning says against what fix_layers changed."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18, resnet50

from fl_dp_lightning.privacy.layers import SHOWN_CHANGES, describe_changes, fix_layers


def counted(module: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


def test_the_warning_counts_a_resnet50s_changes_by_kind_as_fix_layers_made_them():
    net = resnet50()
    for p in net.parameters():
        p.requires_grad_(False)  # a frozen backbone
    norms, blocks = counted(net, nn.BatchNorm2d), len([*net.layer1, *net.layer2, *net.layer3, *net.layer4])
    activations = sum(getattr(m, "inplace", False) for m in net.modules())
    changes = fix_layers(net)
    assert counted(net, nn.GroupNorm) == norms == 53 and blocks == 16 and activations == 17
    assert describe_changes(changes) == (
        f"{norms + blocks + activations} changes: {norms} BatchNorm2d replaced by GroupNorm, its affine weights kept, "
        f"frozen as it was; {blocks} residual blocks add out of place; {activations} activations no longer in place "
        "(each in the log)"
    )
    assert not any(p.requires_grad for p in net.parameters())


def test_a_few_changes_are_listed_each():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
    changes = fix_layers(net)
    assert len(changes) == 2 <= SHOWN_CHANGES and describe_changes(changes) == "; ".join(changes)
    assert changes[0] == "2 no longer works in place" and changes[1].startswith("replaced 1 (BatchNorm2d) with Group")
    assert torch.equal(net[1].weight, torch.ones(4))


def test_trainable_norms_are_counted_apart_from_frozen_ones():
    net = resnet18()
    for p in net.layer4.parameters():
        p.requires_grad_(False)
    text = describe_changes(fix_layers(net))
    frozen = 5  # layer4's two blocks: two norms each, and the downsample's
    assert f"{20 - frozen} BatchNorm2d replaced by GroupNorm, its affine weights kept;" in text
    assert f"{frozen} BatchNorm2d replaced by GroupNorm, its affine weights kept, frozen as it was;" in text
