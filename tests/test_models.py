import torch
from torch import nn

from fl_dp_lightning.models import LitClassifier, seed_cnn


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def test_seed_cnn_matches_the_tutorial_layer_by_layer():
    net = seed_cnn()
    kinds = [type(m) for m in net]
    assert kinds == [
        nn.Conv2d,
        nn.ReLU,
        nn.MaxPool2d,
        nn.Conv2d,
        nn.ReLU,
        nn.MaxPool2d,
        nn.Flatten,
        nn.Linear,
        nn.ReLU,
        nn.Linear,
    ]
    c1, c2, f1, f2 = net[0], net[3], net[7], net[9]
    assert (c1.in_channels, c1.out_channels, c1.kernel_size, c1.stride, c1.padding) == (
        1,
        16,
        (8, 8),
        (2, 2),
        (3, 3),
    )
    assert (c2.in_channels, c2.out_channels, c2.kernel_size, c2.stride, c2.padding) == (
        16,
        32,
        (4, 4),
        (2, 2),
        (0, 0),
    )
    assert (net[2].kernel_size, net[2].stride, net[5].kernel_size, net[5].stride) == (2, 1, 2, 1)
    assert (f1.in_features, f1.out_features, f2.in_features, f2.out_features) == (512, 32, 32, 10)


def test_seed_cnn_shapes_and_parameter_count_follow_from_the_layer_formulas():
    side = conv_out(28, 8, 2, 3)  # 14
    side = conv_out(side, 2)  # pool: 13
    side = conv_out(side, 4, 2)  # 5
    side = conv_out(side, 2)  # pool: 4
    flat = 32 * side * side
    expected_params = (16 * 1 * 8 * 8 + 16) + (32 * 16 * 4 * 4 + 32) + (flat * 32 + 32) + (32 * 10 + 10)
    assert expected_params == 26010
    net = seed_cnn()
    assert sum(p.numel() for p in net.parameters()) == expected_params
    x = torch.zeros(3, 1, 28, 28)
    assert net[:6](x).shape == (3, 32, side, side)
    assert net(x).shape == (3, 10)


def test_classifier_defaults_to_seed_cnn_and_sgd_lr_0_1():
    module = LitClassifier()
    assert sum(p.numel() for p in module.parameters()) == 26010
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 0.1
