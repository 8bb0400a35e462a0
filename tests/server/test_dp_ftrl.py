"""DP-FTRL (tree aggregation restarted every epoch) against independent computations: the dyadic decomposition of
prefix sums, the covariance of the released noise, dp-accounting's tree-aggregation events and the closed form of
the Gaussian mechanism's (epsilon, delta)."""

from __future__ import annotations

import math

import dp_accounting
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from scipy import optimize, stats

from fl_dp_lightning import ConfigError, FederatedDataModule, FederatedDPStrategy, PrivacyConfig
from fl_dp_lightning.config import UserPrivacyConfig
from fl_dp_lightning.privacy.accountants import AddRemovePLDAccountant
from fl_dp_lightning.privacy.tree import TreeNoise, tree_depth
from fl_dp_lightning.server.plan import plan_round
from fl_dp_lightning.server.user_level import UserLevelDP

from ..conftest import make_trainer
from ..strategy.test_strategy import small_classifier, weights

OFF = PrivacyConfig(enabled=False)
ENGINES = pytest.mark.parametrize("engine", ["opacus", "vectorized"])


def dyadic_nodes(t: int) -> list[tuple[int, int]]:
    """The tree nodes (level, index) whose intervals partition rounds 1..t, greedily from the largest."""
    nodes, start = [], 0
    for level in reversed(range(t.bit_length())):
        if start + 2**level <= t:
            nodes.append((level, start // 2**level))
            start += 2**level
    return nodes


def test_each_prefix_of_the_released_noise_is_the_sum_of_its_covering_nodes():
    drawn: dict[int, float] = {}

    def draw() -> dict[str, torch.Tensor]:  # node k drawn gets the value 10^k: sums identify their nodes
        drawn[len(drawn)] = 10.0 ** len(drawn)
        return {"w": torch.tensor([drawn[len(drawn) - 1]], dtype=torch.float64)}

    tree, prefix, order = TreeNoise(), 0.0, {}
    for t in range(1, 16):
        prefix += float(tree.next(draw())["w"])
        order[dyadic_nodes(t)[-1]] = t - 1  # the largest block ending at leaf t is first needed there
        expected = sum(10.0 ** order[node] for node in dyadic_nodes(t))
        assert prefix == pytest.approx(expected, rel=1e-12)
        assert len(tree.nodes) == len(dyadic_nodes(t)) <= tree_depth(t)  # memory: one node per level at most


def tree_release_matrix(rounds: int) -> np.ndarray:
    """Released differences s_t - s_(t-1) as a linear map of the tree's node noises (independent construction)."""
    nodes = sorted({node for t in range(1, rounds + 1) for node in dyadic_nodes(t)})
    prefix = np.array([[node in dyadic_nodes(t) for node in nodes] for t in range(1, rounds + 1)], dtype=float)
    return np.diff(np.vstack([np.zeros(len(nodes)), prefix]), axis=0)


def test_the_released_noise_has_the_trees_covariance_and_bounds_one_clients_influence_by_what_is_accounted():
    """Many runs of the server's release (8-round epochs, two of them) on an empty sum: the measured covariance of
    the released noise equals the tree's; one client's clipped update in any one round of an epoch moves the release
    by a Mahalanobis distance at most the accounted sqrt(depth) / z, and the second epoch's noise is independent."""
    z, clip, rounds_per_epoch, runs = 1.5, 0.4, 8, 6000
    config = UserPrivacyConfig(enabled=True, mechanism="dp_ftrl", noise_multiplier=z, clip=clip)
    mechanism = UserLevelDP(config, sample_rate=1 / rounds_per_epoch, num_clients=8, seeded=True, seed=3,
                            device=torch.device("cpu"))  # fmt: skip
    zero = {"w": torch.zeros(runs, dtype=torch.float64)}  # each coordinate one run
    released = np.stack([mechanism.release(zero)["w"].numpy() for _ in range(2 * rounds_per_epoch)], axis=1)
    released *= mechanism.expected_clients  # the noised sum
    measured = np.cov(released, rowvar=False)
    per_epoch = tree_release_matrix(rounds_per_epoch)
    expected = (z * clip) ** 2 * np.kron(np.eye(2), per_epoch @ per_epoch.T)
    standard_error = (z * clip) ** 2 * math.sqrt(2 / runs) * np.sqrt(np.outer(np.diag(expected), np.diag(expected)))
    assert np.all(np.abs(measured - expected) <= 5 * standard_error / (z * clip) ** 2 + 1e-12)
    influence = clip * np.sqrt(np.diag(np.linalg.inv(measured[:rounds_per_epoch, :rounds_per_epoch])))
    accounted = math.sqrt(tree_depth(rounds_per_epoch)) / z
    assert influence.max() <= accounted * 1.05  # sampling error of the measured covariance
    assert influence.max() >= accounted * 0.95  # tight (leaf 1 lies in depth nodes); fresh noise would give 1 / z
    assert mechanism.depths == [tree_depth(rounds_per_epoch)] * 2


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Epsilon at ``delta`` of a Gaussian mechanism of sensitivity / noise ``mu`` (Balle and Wang 2018, Thm. 8)."""

    def excess(eps: float) -> float:
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta

    return optimize.brentq(excess, 0, 100, xtol=1e-12)


def fit(synthetic, user, *, rounds, clients=12, fraction=0.25, privacy=OFF, engine="opacus", **kwargs):
    pl.seed_everything(0)
    module = small_classifier()
    datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=clients, batch_size=20)
    strategy = FederatedDPStrategy(
        privacy=privacy, user_privacy=user, client_fraction=fraction, client_sampling="epoch", seed=4, engine=engine
    )
    make_trainer(strategy, rounds, **kwargs).fit(module, datamodule)
    return module, strategy


@ENGINES
@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_the_dp_ftrl_epsilon_equals_the_closed_form_and_dp_accountings_tree_events(synthetic, engine, accountant):
    z = 2.0
    user = UserPrivacyConfig(enabled=True, mechanism="dp_ftrl", noise_multiplier=z, clip=0.5, accountant=accountant)
    _, strategy = fit(synthetic, user, rounds=6, engine=engine)  # one epoch of 4 rounds, then 2 of the next
    printed = strategy.user_level.epsilon()
    depths = [tree_depth(4), tree_depth(2)]
    assert strategy.user_level.depths == depths == [3, 2]
    rdp = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    rdp.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(z, [4]))
    rdp.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(z, [2]))
    closed_form = gaussian_epsilon(math.sqrt(sum(depths)) / z, 1e-5)
    if accountant == "pld":
        assert printed == pytest.approx(closed_form, rel=0.01)  # PLD's pessimistic grid
        assert printed >= closed_form * (1 - 1e-6)
    else:
        assert printed == pytest.approx(rdp.get_epsilon(1e-5), rel=0.03)  # another grid of orders
    assert strategy.user_level.report(True)["participation"].startswith("public (DP-FTRL)")


def test_each_client_takes_part_once_an_epoch_and_a_removed_client_moves_no_other():
    steps = {f"client_{i}": 1 for i in range(50)}
    epochs, fraction = 3, 0.2
    plans = [plan_round(steps, fraction, r, seed=9, sampling="epoch").clients for r in range(5 * epochs)]
    for epoch in range(epochs):
        taken = [name for plan in plans[5 * epoch : 5 * epoch + 5] for name in plan]
        assert sorted(taken) == sorted(steps)  # each client exactly once per epoch
    without = {name: s for name, s in steps.items() if name != "client_7"}
    for r, plan in enumerate(plans):
        assert plan_round(without, fraction, r, seed=9, sampling="epoch").clients == [
            n for n in plan if n != "client_7"
        ]


@ENGINES
def test_every_round_of_a_dp_ftrl_run_releases_and_is_accounted_even_when_nobody_takes_part(synthetic, engine):
    user = UserPrivacyConfig(enabled=True, mechanism="dp_ftrl", noise_multiplier=1.0, clip=0.1)
    before = weights(small_classifier())
    module, strategy = fit(synthetic, user, clients=2, fraction=0.125, rounds=3, engine=engine)  # 8-round epochs
    assert strategy.user_level.rounds_released == 3 and strategy.user_level.depths == [tree_depth(3)]
    assert any(not torch.equal(weights(module)[k], v) for k, v in before.items())  # noise moved the model


def test_resume_is_exact_under_seeded_dp_ftrl_and_a_secret_tree_restarts_accounted_by_its_deepest(synthetic, tmp_path):
    seeded = PrivacyConfig(enabled=False, unsafe_seeded_randomness=True)
    user = UserPrivacyConfig(enabled=True, mechanism="dp_ftrl", noise_multiplier=1.0, clip=0.2)

    def resumed(privacy: PrivacyConfig, folder) -> tuple[torch.nn.Module, FederatedDPStrategy]:
        checkpoint = ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0)
        fit(synthetic, user, rounds=3, privacy=privacy, enable_checkpointing=True, callbacks=[checkpoint])
        pl.seed_everything(0)
        module = small_classifier()
        datamodule = FederatedDataModule(train=synthetic.train, test=synthetic.test, clients=12, batch_size=20)
        strategy = FederatedDPStrategy(privacy=privacy, user_privacy=user, client_fraction=0.25,
                                       client_sampling="epoch", seed=4)  # fmt: skip
        trainer = make_trainer(strategy, 6, enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=folder)])
        trainer.fit(module, datamodule, ckpt_path=folder / "last.ckpt")
        return module, strategy

    full, full_strategy = fit(synthetic, user, rounds=6, privacy=seeded)
    module, strategy = resumed(seeded, tmp_path / "seeded")
    for key, value in weights(full).items():
        torch.testing.assert_close(weights(module)[key], value, atol=1e-6, rtol=0)
    assert strategy.user_level.epsilon() == full_strategy.user_level.epsilon()
    # secret noise never reaches a checkpoint: the first epoch's tree restarts after 3 of its 4 rounds
    _, secret = resumed(OFF, tmp_path / "secret")
    assert secret.user_level.depths == [max(tree_depth(3), tree_depth(1)), tree_depth(2)] == [2, 2]
    rdp = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    rdp.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(1.0, [3, 1]))  # one epoch, two trees
    rdp.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(1.0, [2]))
    ours = AddRemovePLDAccountant()
    ours.history = list(secret.user_level.accountant.history)
    assert ours.get_epsilon(1e-5) <= rdp.get_epsilon(1e-5)  # PLD is tighter than RDP on the same events
    assert ours.get_epsilon(1e-5) == pytest.approx(gaussian_epsilon(math.sqrt(4) / 1.0, 1e-5), rel=0.01)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"client_sampling": "poisson", "client_fraction": 0.25}, "set client.sampling=epoch"),
        ({"client_sampling": "epoch", "client_fraction": 0.3}, "must be 1 / \\(rounds per epoch\\)"),
    ],
)
def test_settings_dp_ftrl_cannot_account_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        FederatedDPStrategy(user_privacy=UserPrivacyConfig(enabled=True, mechanism="dp_ftrl"), **settings)
    with pytest.raises(ConfigError, match="user_privacy.adaptive_clipping=True: not accounted under"):
        UserPrivacyConfig(enabled=True, mechanism="dp_ftrl", adaptive_clipping=True)
