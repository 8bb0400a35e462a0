import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_dp_lightning.data.partition import (
    dirichlet_partition,
    iid_partition,
    quantity_skew_partition,
    shard_partition,
)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 500), k=st.integers(1, 20), seed=st.integers(0, 2**31))
def test_iid_partition_covers_every_index_once_in_near_equal_shares(n, k, seed):
    if n < k:
        with pytest.raises(ValueError):
            iid_partition(n, k, seed)
        return
    shares = iid_partition(n, k, seed)
    assert sorted(torch.cat(shares).tolist()) == list(range(n))
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1


def test_iid_partition_is_seeded():
    assert all(torch.equal(a, b) for a, b in zip(iid_partition(100, 3, 1), iid_partition(100, 3, 1)))
    assert not all(torch.equal(a, b) for a, b in zip(iid_partition(100, 3, 1), iid_partition(100, 3, 2)))


def test_dirichlet_partition_covers_every_index_and_skews_labels():
    labels = torch.arange(10).repeat_interleave(100)
    shares = dirichlet_partition(labels, 5, alpha=0.1, seed=0)
    assert sorted(torch.cat(shares).tolist()) == list(range(1000))
    # with alpha 0.1 most clients are dominated by few classes: the top class holds > 40% of a share
    top = [torch.bincount(labels[s], minlength=10).max().item() / max(len(s), 1) for s in shares if len(s)]
    assert sum(t > 0.4 for t in top) >= 3


def test_the_data_module_splits_any_dataset_by_label_for_dirichlet():
    from torch.utils.data import Dataset

    from fl_dp_lightning import FederatedDataModule

    class Pairs(Dataset):  # a map-style data set that is not a TensorDataset
        def __len__(self):
            return 200

        def __getitem__(self, i):
            return torch.full((2,), float(i)), i % 4

    dm = FederatedDataModule(train=Pairs(), test=Pairs(), clients=3, partition="dirichlet", dirichlet_alpha=0.3)
    dm.setup("fit")
    seen = sorted(int(ds[j][0][0]) for ds in dm.client_datasets.values() for j in range(len(ds)))
    assert seen == list(range(200))


def test_label_shards_give_each_client_its_shards_of_sorted_labels():
    labels = torch.arange(10).repeat_interleave(100)  # 10 classes x 100, as a sorted MNIST would be
    shares = shard_partition(labels, num_clients=5, shards_per_client=2, seed=3)
    assert sorted(torch.cat(shares).tolist()) == list(range(1000))
    assert [len(s) for s in shares] == [200] * 5  # 10 shards of 100 records, 2 each
    # 10 shards of 100 sorted labels are exactly the 10 classes: each client holds two whole classes
    held = [sorted(set(labels[s].tolist())) for s in shares]
    assert all(len(h) == 2 for h in held) and sorted(c for h in held for c in h) == list(range(10))
    assert shard_partition(labels, 5, 2, seed=3)[0].tolist() == shares[0].tolist()  # seeded
    assert shard_partition(labels, 5, 2, seed=4)[0].tolist() != shares[0].tolist()
    with pytest.raises(ValueError, match="client.shards_per_client=2"):
        shard_partition(labels[:9], 5, 2, seed=0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(20, 2000), k=st.integers(1, 20), sigma=st.floats(0, 2), seed=st.integers(0, 2**31))
def test_quantity_skew_covers_every_index_once_with_at_least_one_each(n, k, sigma, seed):
    shares = quantity_skew_partition(n, k, sigma, seed)
    assert sorted(torch.cat(shares).tolist()) == list(range(n))
    assert len(shares) == k and min(len(s) for s in shares) >= 1


def test_quantity_skew_sizes_follow_the_log_normal_draws():
    sizes = [len(s) for s in quantity_skew_partition(100_000, 50, 1.0, seed=0)]
    log_sizes = torch.tensor(sizes, dtype=torch.float64).log()
    assert 0.7 < float(log_sizes.std()) < 1.3  # log-normal(0, 1) proportions: log sizes spread with std ~1
    equal = [len(s) for s in quantity_skew_partition(1000, 10, 0.0, seed=0)]
    assert equal == [100] * 10  # sigma 0 is the IID split's sizes
