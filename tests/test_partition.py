import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_dp_lightning.data.partition import dirichlet_partition, iid_partition


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
