"""Secure aggregation: the decoded sum equals the plain one within the quantization error, a masked update says
nothing about the plain one, and dropped clients are recovered with t survivors and refused with t - 1."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from fl_dp_lightning import ConfigError, FederatedDataModule, FederatedDPStrategy, PrivacyConfig
from fl_dp_lightning.config import SecureAggregationConfig, UserPrivacyConfig
from fl_dp_lightning.server.secure_sum import (
    DH_PRIME,
    SecureRound,
    decode,
    encode,
    neighbours,
    pair_seed,
    prg,
    shamir_combine,
    shamir_split,
)

from ..conftest import make_trainer
from ..runtime.test_faults import FailsFor
from ..strategy.test_strategy import small_classifier, weights

SCALE, BITS = 2.0**16, 40


def test_fixed_point_encoding_round_trips_within_half_a_step_and_refuses_overflow():
    values = np.random.default_rng(0).normal(0, 100, 10_000)
    decoded = decode(encode(values, scale=SCALE, bits=BITS, clients=4), scale=SCALE, bits=BITS)
    assert np.abs(decoded - values).max() <= 0.5 / SCALE
    with pytest.raises(
        ConfigError, match="overflows 40 bits at scale 65536 over 2 clients; raise secure_aggregation.bits"
    ):
        encode(np.array([2.0**22]), scale=SCALE, bits=BITS, clients=2)


def test_shamir_rebuilds_a_secret_from_any_t_shares_and_refuses_fewer():
    secret = 2**255 + 12345
    shares = shamir_split(secret, parties=list(range(7)), threshold=4)
    assert shamir_combine({p: shares[p] for p in (6, 1, 3, 0)}, 4) == secret
    assert shamir_combine({p: shares[p] for p in (2, 4, 5, 6)}, 4) == secret
    with pytest.raises(ConfigError, match="3 shares, 4 needed"):
        shamir_combine({p: shares[p] for p in (0, 1, 2)}, 4)


def secure_sum(updates: list[np.ndarray], dropped: set[int] = frozenset(), **kwargs) -> np.ndarray:
    round_ = SecureRound(len(updates), bits=BITS, scale=SCALE, threshold=0.5, degree=None, seed=0, **kwargs)
    for index, update in enumerate(updates):
        if index not in dropped:
            round_.submit(index, update)
    return round_.unmask(len(updates[0]))


def test_the_decoded_sum_equals_the_plain_sum_within_the_quantization_error():
    rng = np.random.default_rng(1)
    updates = [rng.normal(0, 3, 5_000) for _ in range(5)]
    total = secure_sum(updates)
    assert np.abs(total - sum(updates)).max() <= 5 * 0.5 / SCALE


def test_a_masked_update_is_uncorrelated_with_the_plain_one():
    rng = np.random.default_rng(2)
    updates = [rng.normal(0, 3, 20_000) for _ in range(3)]
    round_ = SecureRound(3, bits=BITS, scale=SCALE, threshold=0.5, degree=None, seed=0)
    plain = encode(updates[0], scale=SCALE, bits=BITS, clients=3)
    masked = round_.clients[0].mask(plain, round_.public_keys, round_.graph, BITS)
    signed_plain = decode(plain, scale=SCALE, bits=BITS)
    correlation = np.corrcoef(signed_plain, masked.astype(np.float64))[0, 1]
    assert abs(correlation) < 5 / math.sqrt(len(plain))  # 5 standard errors of a correlation of independent draws
    # and the masked integers are spread over the whole modulus, as uniform draws would be
    assert abs(masked.astype(np.float64).mean() / 2**BITS - 0.5) < 5 * math.sqrt(1 / 12 / len(plain))


def test_dropped_clients_are_recovered_with_t_survivors_and_refused_with_t_minus_one():
    rng = np.random.default_rng(3)
    updates = [rng.normal(0, 1, 1_000) for _ in range(6)]  # protocol at threshold 0.5 of a neighbourhood of 6: t = 3
    kept = secure_sum(updates, dropped={0, 2, 5})  # 3 survivors
    assert np.abs(kept - (updates[1] + updates[3] + updates[4])).max() <= 3 * 0.5 / SCALE
    with pytest.raises(ConfigError, match="2 shares, 3 needed"):
        secure_sum(updates, dropped={0, 1, 2, 5})  # 2 survivors


def test_a_sparse_neighbour_graph_is_symmetric_and_still_sums_exactly():
    graph = neighbours(30, 6, seed=4)
    assert all(len(g) == 6 and i not in g and all(i in graph[j] for j in g) for i, g in enumerate(graph))
    rng = np.random.default_rng(5)
    updates = [rng.normal(0, 1, 500) for _ in range(30)]
    round_ = SecureRound(30, bits=BITS, scale=SCALE, threshold=0.5, degree=6, seed=4)
    for index, update in enumerate(updates):
        if index != 7:
            round_.submit(index, update)
    assert np.abs(round_.unmask(500) - (sum(updates) - updates[7])).max() <= 30 * 0.5 / SCALE


def fit(synthetic, secure: bool, make_module=small_classifier, user=None, engine="opacus"):
    pl.seed_everything(0)
    module = make_module()
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=["a", "b", "c"], batch_size=40)
    strategy = FederatedDPStrategy(
        privacy=PrivacyConfig(unsafe_seeded_randomness=True),
        secure_aggregation=SecureAggregationConfig(enabled=secure),
        user_privacy=user,
        engine=engine,
    )
    make_trainer(strategy, 2, limit_val_batches=0).fit(module, datamodule)
    return module, strategy


@pytest.mark.parametrize("engine", ["opacus", "vectorized"])
@pytest.mark.parametrize("user", [None, UserPrivacyConfig(enabled=True, clip=0.5)])
def test_a_run_with_secure_aggregation_equals_the_run_without_within_the_quantization_error(synthetic, user, engine):
    plain, _ = fit(synthetic, False, user=user, engine=engine)
    secure, strategy = fit(synthetic, True, user=user, engine=engine)
    # each coordinate of each weighted contribution is rounded to 1 / scale; three clients per round
    for key, value in weights(plain).items():
        torch.testing.assert_close(weights(secure)[key], value, atol=1e-4, rtol=0)
    report = json.loads((Path(strategy.lightning_module.trainer.default_root_dir) / "privacy_report.json").read_text())
    assert any(line.startswith("secure aggregation (simulated)") for line in report["released"])


def test_a_client_that_fails_after_masking_is_recovered_as_a_dropout(synthetic):
    plain, _ = fit(synthetic, False, make_module=lambda: FailsFor("b"))
    secure, strategy = fit(synthetic, True, make_module=lambda: FailsFor("b"))
    assert [f["client"] for f in strategy.faults] == ["b"]
    for key, value in weights(plain).items():
        torch.testing.assert_close(weights(secure)[key], value, atol=1e-4, rtol=0)


def test_a_server_that_lies_about_a_dropout_still_cannot_read_that_clients_update():
    # the attack double masking stops: client 0 sent its masked update, the server claims it dropped, the
    # survivors reveal client 0's DH secret, and the server strips client 0's pairwise masks from what it received
    rng = np.random.default_rng(6)
    update = rng.normal(0, 3, 20_000)
    round_ = SecureRound(4, bits=BITS, scale=SCALE, threshold=0.5, degree=None, seed=0)
    sent = round_.clients[0].mask(
        encode(update, scale=SCALE, bits=BITS, clients=4), round_.public_keys, round_.graph, BITS
    )
    key = shamir_combine({h: round_.clients[h].held["key"][0][h] for h in (1, 2, 3)}, round_.thresholds[0])
    stripped = sent.copy()
    for other in round_.graph[0]:
        pad = prg(pair_seed(pow(round_.public_keys[other], key, DH_PRIME), 0, other), len(update), BITS)
        stripped = stripped - pad if other > 0 else stripped + pad
    leaked = decode(stripped, scale=SCALE, bits=BITS)
    assert abs(np.corrcoef(leaked, update)[0, 1]) < 5 / math.sqrt(len(update))  # the self mask still hides it
    # control: only with the self-mask seed too, which no honest survivor reveals for a client it was told dropped,
    # does the update come out
    seed = shamir_combine({h: round_.clients[h].held["self"][0][h] for h in (1, 2, 3)}, round_.thresholds[0])
    revealed = decode(stripped - prg(seed.to_bytes(32, "big"), len(update), BITS), scale=SCALE, bits=BITS)
    assert np.abs(revealed - update).max() <= 0.5 / SCALE


def split_view_attack(count: int, threshold: float) -> np.ndarray | None:
    """A server that tells some of client 0's neighbours that it dropped (they reveal its DH key share) and the
    others that it survived (they, and client 0 itself, reveal its self-mask share), over every split; client 0's
    decoded update where some split yields both secrets, else None."""
    update = np.random.default_rng(7).normal(0, 3, 2_000)
    round_ = SecureRound(count, bits=BITS, scale=SCALE, threshold=threshold, degree=None, seed=0)
    sent = round_.clients[0].mask(encode(update, scale=SCALE, bits=BITS, clients=count), round_.public_keys,
                                  round_.graph, BITS)  # fmt: skip
    others = sorted(round_.graph[0])
    for told_dropped in range(len(others) + 1):
        key_holders, self_holders = others[:told_dropped], [0, *others[told_dropped:]]
        try:
            key = shamir_combine({h: round_.clients[h].held["key"][0][h] for h in key_holders}, round_.thresholds[0])
            seed = shamir_combine({h: round_.clients[h].held["self"][0][h] for h in self_holders}, round_.thresholds[0])
        except ConfigError:
            continue
        stripped = sent - prg(seed.to_bytes(32, "big"), len(update), BITS)
        for other in round_.graph[0]:
            pad = prg(pair_seed(pow(round_.public_keys[other], key, DH_PRIME), 0, other), len(update), BITS)
            stripped = stripped - pad if other > 0 else stripped + pad
        decoded = decode(stripped, scale=SCALE, bits=BITS)
        assert np.abs(decoded - update).max() <= 0.5 / SCALE  # the attack, when it gets both secrets, works
        return decoded
    return None


@pytest.mark.parametrize("count", [4, 6, 10])
def test_a_server_that_splits_its_view_of_a_dropout_recovers_nothing_at_the_default_threshold(count):
    assert split_view_attack(count, SecureAggregationConfig().threshold) is None
    assert split_view_attack(count, 0.5) is not None  # power: at half a neighbourhood it reads the update


def test_thresholds_of_half_a_neighbourhood_or_less_are_refused():
    with pytest.raises(ConfigError, match=r"secure_aggregation.threshold=0.5: must be in \(0.5, 1\]"):
        SecureAggregationConfig(enabled=True, threshold=0.5)


@pytest.mark.parametrize("user", [None, UserPrivacyConfig(enabled=True, clip=0.5)], ids=["fedavg", "user_level"])
def test_an_overflowing_modulus_is_refused_before_any_privacy_is_spent_quoting_no_client_value(synthetic, user):
    module = small_classifier()
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=["a", "b", "c"], batch_size=40)
    strategy = FederatedDPStrategy(
        privacy=PrivacyConfig(), secure_aggregation=SecureAggregationConfig(enabled=True, bits=16), user_privacy=user
    )
    with pytest.raises(
        ConfigError, match=r"secure_aggregation: 3 contributions of up to .* \((the user-level clip|400 records)"
    ):
        make_trainer(strategy, 1, limit_val_batches=0).fit(module, datamodule)
    assert all(not c.accountant.history for c in strategy.clients.values())


def test_an_overflow_at_encoding_quotes_no_value():
    with pytest.raises(ConfigError) as raised:
        encode(np.array([0.123456, 98765.4321]), scale=SCALE, bits=20, clients=2)
    assert "98765" not in str(raised.value) and "0.1234" not in str(raised.value)
