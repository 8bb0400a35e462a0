"""Canaries, their scores and the guesser, checked against direct computations."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fl_dp_lightning.audit.canaries import canary_scores, draw_canaries, guess, with_canaries


def test_each_canary_enters_with_the_label_its_coin_chose_and_the_coins_are_fair_and_secret():
    like = 0.3 + 2 * torch.randn(64, 1, 28, 28)
    canaries = draw_canaries(4000, like, num_classes=10, scale=5.0, seed=3)
    x, y = canaries.records().tensors
    first, second = canaries.labels.T
    assert torch.equal(y, torch.where(canaries.coins, first, second)) and bool((first != second).all())
    assert abs(canaries.coins.float().mean().item() - 0.5) < 0.03
    assert abs(x.std().item() / like.std().item() - 5.0) < 0.1 and x.shape == (4000, 1, 28, 28)
    unseeded = [draw_canaries(64, like, 10).coins for _ in range(2)]
    assert not torch.equal(*unseeded)  # drawn from the OS's randomness: not reproducible from any seed we hold


def test_canaries_follow_the_clients_records():
    records = TensorDataset(torch.randn(10, 3), torch.arange(10))
    canaries = draw_canaries(4, records.tensors[0], num_classes=10, seed=0)
    joined = with_canaries(records, canaries)
    assert isinstance(joined, TensorDataset) and len(joined) == 14
    assert torch.equal(joined.tensors[1][10:], canaries.records().tensors[1])


def test_a_canarys_score_is_its_first_labels_log_probability_minus_its_seconds():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    canaries = draw_canaries(7, torch.randn(8, 3, 4), num_classes=5, seed=1)
    log_p = torch.log_softmax(model(canaries.inputs), dim=1).detach()
    expected = [log_p[i, a] - log_p[i, b] for i, (a, b) in enumerate(canaries.labels.tolist())]
    assert torch.allclose(canary_scores(model, canaries, batch_size=3), torch.stack(expected))


def test_the_guesser_says_true_for_the_highest_scores_false_for_the_lowest_and_abstains_between():
    slots, guesses = guess(torch.tensor([0.1, 5.0, -3.0, 0.2, 2.0, -1.0]), 4)
    assert slots.tolist() == [1, 4, 5, 2] and guesses.tolist() == [True, True, False, False]
