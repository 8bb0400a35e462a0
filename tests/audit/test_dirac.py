"""Dirac canaries against direct computations: where they sit, how they enter a step, how they score."""

from __future__ import annotations

import torch

from fl_dp_lightning.audit.dirac import draw_dirac_canaries
from fl_dp_lightning.runtime.vectorized.dpsgd import clip_and_sum

SHAPES = {"conv.weight": torch.Size([4, 1, 3, 3]), "conv.bias": torch.Size([4]), "fc.weight": torch.Size([2, 7])}


def flat(tensors: dict) -> torch.Tensor:
    return torch.cat([tensors[name].flatten(-len(shape)) for name, shape in SHAPES.items()], dim=-1)


def test_each_canary_is_one_signed_coordinate_of_its_norm_at_a_distinct_place_with_fair_secret_coins():
    canaries = draw_dirac_canaries(50, SHAPES, norm=10.0, seed=4)
    assert len(set(canaries.positions.tolist())) == 50 and int(canaries.positions.max()) < 36 + 4 + 14
    everything = torch.arange(50)
    like = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    rows = flat(canaries.per_example(everything, like))  # [50, 54]
    assert torch.equal(rows.norm(dim=1), torch.full((50,), 10.0))
    expected = torch.zeros(50, 54)
    expected[everything, canaries.positions] = torch.where(canaries.coins, 10.0, -10.0)
    assert torch.equal(rows, expected)
    assert torch.equal(flat(canaries.summed(everything, like)), expected.sum(0))
    many = draw_dirac_canaries(4000, {"w": torch.Size([5000])}, 1.0, seed=0).coins
    assert abs(many.float().mean().item() - 0.5) < 0.03
    unseeded = [draw_dirac_canaries(40, SHAPES, 1.0).coins for _ in range(2)]
    assert not torch.equal(*unseeded)


def test_a_step_samples_each_canary_with_the_records_rate():
    canaries = draw_dirac_canaries(1000, {"w": torch.Size([2000])}, 1.0, seed=1)
    counts = torch.stack([torch.bincount(canaries.sample(0.1), minlength=1000) for _ in range(200)]).float()
    assert abs(counts.mean().item() - 0.1) < 0.005  # 20,000 draws of Bernoulli(0.1) per canary, on average
    assert counts.sum(0).std().item() < 7  # and no canary favoured: Binomial(200, 0.1) has std 4.2


def test_clipped_as_the_engine_clips_records_each_canary_adds_the_clip_norm_with_its_sign():
    canaries = draw_dirac_canaries(30, SHAPES, norm=10.0, seed=2)
    chosen = torch.tensor([0, 3, 7, 29])
    like = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    rows = {n: g[None] for n, g in canaries.per_example(chosen, like).items()}
    clipped = flat({n: g[0] for n, g in clip_and_sum(rows, torch.ones(1, 4), torch.tensor([1.5])).items()})
    expected = torch.zeros(54)
    expected[canaries.positions[chosen]] = torch.where(canaries.coins[chosen], 1.5, -1.5)
    assert torch.allclose(clipped, expected, atol=1e-5)


def test_a_canarys_score_is_how_far_gradient_descent_moved_its_coordinate_down():
    canaries = draw_dirac_canaries(20, SHAPES, norm=1.0, seed=3)
    initial = {name: torch.randn(shape) for name, shape in SHAPES.items()}
    step = canaries.summed(torch.arange(20), initial)
    released = {name: initial[name] - 0.1 * step[name] for name in SHAPES}  # one SGD step on the canaries alone
    scores = canaries.scores(initial, released)
    assert torch.allclose(scores, torch.where(canaries.coins, 0.1, -0.1))
    assert torch.equal(scores > 0, canaries.coins)
