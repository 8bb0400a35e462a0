"""Per-example gradients by Opacus's per-layer rules, against each example's own gradient (``vmap``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fl_dp_lightning import ConfigError, FederatedDataModule, FederatedDPStrategy, LitClassifier, PrivacyConfig
from fl_dp_lightning.config import EngineConfig
from fl_dp_lightning.models import seed_cnn
from fl_dp_lightning.privacy.per_example import (
    ContiguousGradSampleModule,
    channels_last,
    layer_rules,
    loaded,
    per_example_gradients,
)
from fl_dp_lightning.runtime.vectorized import engine as engine_module
from fl_dp_lightning.runtime.vectorized.dpsgd import clip_and_sum, clip_and_sum_by_client

from ..conftest import make_trainer
from ..runtime.test_vectorized import assert_same_weights, fit

SEEDED = PrivacyConfig(noise_multiplier=1.0, unsafe_seeded_randomness=True)


def conv_net() -> nn.Sequential:
    """Convolutions from one and from several channels, GroupNorm, pooling and a frozen linear layer."""
    net = nn.Sequential(
        nn.Conv2d(1, 4, 5, stride=2, padding=2),
        nn.GroupNorm(2, 4),
        nn.Tanh(),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.MaxPool2d(2, 1),
        nn.Flatten(),
        nn.Linear(6 * 5 * 5, 16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.Linear(16, 10),
    )
    net[8].requires_grad_(False)
    return net


def each_example_alone(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


@pytest.mark.parametrize("layout_channels_last", [False, True])
def test_per_layer_rules_give_each_examples_own_gradient(layout_channels_last):
    torch.manual_seed(0)
    net = conv_net()
    x, y = torch.randn(7, 1, 28, 28), torch.randint(0, 10, (7,))
    trained = [n for n, p in net.named_parameters() if p.requires_grad]
    rules = layer_rules(net, trained)
    assert not isinstance(rules, str), rules
    params = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    with loaded(rules.parameters, params, layout_channels_last=layout_channels_last):
        got, losses, output = per_example_gradients(
            rules,
            net,
            channels_last(x) if layout_channels_last else x,
            y,
            lambda o, t: F.cross_entropy(o, t, reduction="none"),
        )
    expected = each_example_alone(net, x, y)
    assert sorted(got) == sorted(expected) == sorted(trained)  # the frozen layer is left out
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(losses, F.cross_entropy(net(x), y, reduction="none"), atol=1e-5, rtol=1e-5)
    assert output.shape == (7, 10)


def test_loaded_swaps_values_in_and_back_out():
    net = conv_net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    zeros = {"0.weight": torch.zeros(4, 1, 5, 5)}
    with loaded(dict(net.named_parameters()), zeros, layout_channels_last=True):
        assert float(net[0].weight.abs().sum()) == 0
        assert net[0].weight.stride() == (25, 1, 5, 1)  # channels-last strides even with one input channel
    for name, value in net.named_parameters():
        assert torch.equal(value, before[name])


def test_layers_without_a_rule_or_sharing_a_parameter_have_no_rules():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(10))

        def forward(self, x):
            return x * self.gain

    assert "Scale (1) has no per-example rule" in layer_rules(nn.Sequential(nn.Linear(4, 10), Scale()), ["0.weight"])
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    assert "shares a parameter" in layer_rules(tied, ["0.weight", "0.bias", "1.bias"])


def test_clip_and_sum_by_client_equals_clipping_the_padded_batches():
    torch.manual_seed(1)
    grads = {"w": torch.randn(2, 4, 3, 5) * 2, "b": torch.randn(2, 4, 5)}
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float)
    norms = torch.tensor([0.5, 2.0])
    padded = clip_and_sum(grads, mask, norms)
    real = mask.bool()
    owner = torch.tensor([0, 0, 1, 1, 1, 1])
    flat = clip_and_sum_by_client({n: g[real] for n, g in grads.items()}, owner, 2, norms)
    for name, value in padded.items():
        torch.testing.assert_close(flat[name], value, atol=1e-6, rtol=1e-6)


def test_opacus_hooks_on_a_channels_last_module_give_each_examples_own_gradient():
    # Opacus's convolution rule reads its input by contiguous strides; the strategy's GradSampleModule hands it
    # contiguous inputs, so a module moved to channels-last gets the right per-example gradients
    torch.manual_seed(2)
    net = seed_cnn()
    x, y = torch.randn(5, 1, 28, 28), torch.randint(0, 10, (5,))
    expected = each_example_alone(net, x, y)
    for param in net.parameters():
        param.data = channels_last(param.data)
    module = ContiguousGradSampleModule(net, loss_reduction="sum")
    F.cross_entropy(module(channels_last(x)), y, reduction="sum").backward()
    for name, param in net.named_parameters():
        torch.testing.assert_close(param.grad_sample, expected[name], atol=1e-5, rtol=1e-4)


def cnn_fit(synthetic, engine):
    torch.manual_seed(0)
    return fit(synthetic, engine, module=LitClassifier(seed_cnn(), lr=0.05), rounds=1)


@pytest.mark.parametrize("memory_format", ["preserve", "channels_last"])
def test_a_cnn_trains_the_same_rounds_by_rules_by_vmap_and_by_the_opacus_engine(synthetic, memory_format):
    opacus_module, opacus = cnn_fit(synthetic, EngineConfig(memory_format=memory_format))
    vmap_module, _ = cnn_fit(synthetic, EngineConfig(name="vectorized", per_example="vmap"))
    rules_module, rules = cnn_fit(
        synthetic, EngineConfig(name="vectorized", per_example="layers", memory_format=memory_format)
    )
    assert rules._batch_runtime.rules is not None
    # the Opacus engine trained channels-last on CPU cores and gave the module its own layout back
    assert all(p.is_contiguous() for p in opacus_module.parameters())
    assert_same_weights(vmap_module, rules_module)
    assert_same_weights(opacus_module, rules_module)
    assert rules.epsilons() == opacus.epsilons()


class MixesTheBatch(LitClassifier):
    """Subtracts the batch mean: each example's output depends on the others (per-example bounds break)."""

    def forward(self, x):
        return self.net(x - x.mean(0, keepdim=True))


class TwiceThroughALayer(LitClassifier):
    def forward(self, x):
        hidden = self.net[2](self.net[1](self.net[0](x)))
        return self.net[4](self.net[3](self.net[3](hidden)))


@pytest.mark.parametrize("module", [MixesTheBatch, TwiceThroughALayer])
def test_a_forward_the_rules_cannot_follow_falls_back_to_vmap_or_is_refused_when_asked_for(synthetic, module):
    def make():
        torch.manual_seed(0)
        layers = (nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 10))
        return module(nn.Sequential(*layers), lr=0.05)

    auto_module, auto = fit(synthetic, EngineConfig(name="vectorized"), module=make(), rounds=1)
    assert auto._batch_runtime.rules is None
    vmap_module, _ = fit(synthetic, EngineConfig(name="vectorized", per_example="vmap"), module=make(), rounds=1)
    assert_same_weights(vmap_module, auto_module)
    strategy = FederatedDPStrategy(privacy=SEEDED, engine=EngineConfig(name="vectorized", per_example="layers"))
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=2, batch_size=32)
    with pytest.raises(ConfigError, match="engine.per_example=layers cannot train .*use engine.per_example=vmap"):
        make_trainer(strategy, 1).fit(make(), datamodule)
    assert all(not c.accountant.history for c in strategy.clients.values())


def test_a_first_step_cut_into_small_passes_across_clients_trains_the_same(synthetic, monkeypatch):
    # a round's first step runs all clients' records in shared passes; passes of 5 records cut clients apart
    whole, _ = fit(synthetic, EngineConfig(name="vectorized"), rounds=1)
    monkeypatch.setattr(engine_module, "SHARED_PASS", 5)
    cut, _ = fit(synthetic, EngineConfig(name="vectorized"), rounds=1)
    assert_same_weights(whole, cut)


@pytest.mark.parametrize("secure_mode", [False, True])
def test_the_vectorized_engines_noise_is_opacus_noise_from_the_same_stream(secure_mode):
    from opacus.optimizers.optimizer import _generate_noise

    from fl_dp_lightning.runtime.vectorized.dpsgd import gaussian_noise

    like = torch.zeros(3, 5)
    ours = gaussian_noise(0.7, like, torch.Generator().manual_seed(4), secure_mode)
    theirs = _generate_noise(0.7, like, torch.Generator().manual_seed(4), secure_mode)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert float(ours.std()) > 0.2
