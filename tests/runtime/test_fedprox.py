"""FedProx: mu * (w - w_global) joins each step's gradient; without DP it equals the loss-term form, under DP it
is added to the noised update (a loss term would be dropped by per-example gradients)."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from fl_dp_lightning import ConfigError, FederatedDataModule, FederatedDPStrategy, LitClassifier, PrivacyConfig
from fl_dp_lightning.privacy.randomness import NOISE_STREAM, SAMPLER_STREAM, client_seed
from fl_dp_lightning.runtime.sampling import poisson_batches

from ..conftest import make_trainer
from ..strategy.test_strategy import small_classifier, split, weights

MU, LR = 0.5, 0.05


class ProxInTheLoss(LitClassifier):
    """FedProx written the textbook way: the proximal term in the loss (fine without DP only)."""

    def __init__(self, net, anchor):
        super().__init__(net, lr=LR)
        self.anchor = anchor

    def training_step(self, batch, batch_idx):
        x, y = batch
        prox = sum((p - a).pow(2).sum() for p, a in zip(self.net.parameters(), self.anchor))
        return F.cross_entropy(self(x), y) + MU / 2 * prox


def test_without_dp_the_proximal_gradient_equals_the_proximal_term_in_the_loss(synthetic):
    parts = split(synthetic.train, [300, 500])
    pl.seed_everything(0)
    init = small_classifier(lr=LR)
    anchor = [p.detach().clone() for p in init.net.parameters()]
    results = []
    for module, mu in ((copy.deepcopy(init), MU), (ProxInTheLoss(copy.deepcopy(init.net), anchor), 0.0)):
        datamodule = FederatedDataModule(train={"a": parts[0], "b": parts[1]}, test=synthetic.test, batch_size=50)
        strategy = FederatedDPStrategy(privacy=PrivacyConfig(enabled=False), proximal_mu=mu, seed=4)
        make_trainer(strategy, 1, limit_val_batches=0).fit(module, datamodule)
        results.append({k: v for k, v in weights(module).items() if k.startswith("net.")})
    plain = copy.deepcopy(init)
    datamodule = FederatedDataModule(train={"a": parts[0], "b": parts[1]}, test=synthetic.test, batch_size=50)
    make_trainer(FederatedDPStrategy(privacy=PrivacyConfig(enabled=False), seed=4), 1, limit_val_batches=0).fit(
        plain, datamodule
    )
    for key, value in results[0].items():
        assert torch.allclose(results[1][key], value, atol=1e-6), key
    assert any(not torch.allclose(weights(plain)[k], v, atol=1e-4) for k, v in results[0].items())  # mu mattered


def test_under_dp_a_fedprox_round_equals_dp_sgd_written_out_by_hand_with_the_proximal_gradient():
    # one client, seeded randomness so the hand computation can draw the same batches and the same noise: each step
    # clips every example's gradient to C, adds N(0, (sigma C)^2) noise, divides by the expected batch size, then
    # adds mu * (w - w_global) and takes an SGD step
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(200, 1, 28, 28, generator=gen), torch.randint(0, 10, (200,), generator=gen))
    batch, seed, sigma, clip = 50, 9, 1.0, 0.5
    pl.seed_everything(0)
    init = small_classifier(lr=LR)
    module = copy.deepcopy(init)
    privacy = PrivacyConfig(noise_multiplier=sigma, max_grad_norm=clip, unsafe_seeded_randomness=True)
    strategy = FederatedDPStrategy(privacy=privacy, proximal_mu=MU, seed=seed)
    datamodule = FederatedDataModule(train={"only": data}, test=data, batch_size=batch)
    make_trainer(strategy, 1, limit_val_batches=0).fit(module, datamodule)

    net = copy.deepcopy(init.net)
    params = list(net.parameters())
    anchor = [p.detach().clone() for p in params]
    sampler = torch.Generator().manual_seed(client_seed(seed, 0, SAMPLER_STREAM))
    noise = torch.Generator().manual_seed(client_seed(seed, 0, NOISE_STREAM))
    x, y = data.tensors
    for indices in poisson_batches(200, batch / 200, 4, sampler):
        summed = [torch.zeros_like(p) for p in params]
        for i in indices:
            grads = torch.autograd.grad(F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]), params)
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
            factor = (clip / (norm + 1e-6)).clamp(max=1.0)
            summed = [s + factor * g for s, g in zip(summed, grads)]
        with torch.no_grad():
            for p, s, a in zip(params, summed, anchor):
                noised = (s + torch.normal(0.0, sigma * clip, size=p.shape, generator=noise)) / batch
                p -= LR * (noised + MU * (p - a))
    for key, value in net.state_dict().items():
        assert torch.allclose(module.net.state_dict()[key], value, atol=1e-5), key


def test_a_negative_mu_is_refused():
    with pytest.raises(ConfigError, match="proximal_mu=-0.1"):
        FederatedDPStrategy(proximal_mu=-0.1)
