"""FederatedDataModule: per-client training sets plus a shared validation/test set."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler, Subset, TensorDataset

from fl_dp_lightning.config import ClientConfig, ConfigError, DataConfig
from fl_dp_lightning.data.features import with_features
from fl_dp_lightning.data.partition import (
    dirichlet_partition,
    holdout_split,
    iid_partition,
    quantity_skew_partition,
    shard_partition,
)
from fl_dp_lightning.data.sources import DataSource, load_fashion_mnist, load_mnist, load_synthetic


class ClientDatasets:
    """Each client's training set and the expected batch size; what ``train_dataloader`` returns.

    It is not iterable on its own: :class:`~fl_dp_lightning.FederatedDPStrategy` decides which records each
    batch holds (Poisson sampling), because the privacy accounting depends on it.

    Args:
        datasets: each client's training set, by client name.
        batch_size: expected records per client batch.
        holdouts: each client's held-out records, to evaluate the global model on.
        public: public records in the clients' format (the shared test set), from which the sensitivity probe
            draws its batches (the data's scale and classes); random records when ``None``.
        num_classes: the number of classes of integer labels (public), for the probe's random labels.
    """

    def __init__(
        self,
        datasets: Mapping[str, Dataset],
        batch_size: int,
        holdouts: Mapping[str, Dataset] | None = None,
        *,
        public: Dataset | None = None,
        num_classes: int | None = None,
    ):
        if not datasets:
            raise ConfigError("ClientDatasets needs at least one client")
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: must be >= 1")
        empty = [name for name, ds in datasets.items() if len(ds) == 0]
        if empty:
            raise ConfigError(
                f"clients {empty} hold no training examples: use fewer clients (client.count) or a less skewed "
                "partition (a larger client.dirichlet_alpha)"
            )
        self.datasets = dict(datasets)
        self.batch_size = batch_size
        self.holdouts = dict(holdouts or {})
        """Each client's held-out records, to evaluate the global model on (none unless asked for)."""
        self.public = public
        self.num_classes = num_classes

    def hand_over_records(self) -> None:
        """Drops the records (they now live in the clients' datasites), keeping each client's count."""
        self.datasets = counts_only(self.datasets)

    def __iter__(self) -> Iterator:
        raise TypeError(
            "ClientDatasets are sampled by the federated strategy: pass "
            "Trainer(strategy=FederatedDPStrategy(...)) to train on them."
        )
        yield  # a generator, so Lightning's iterability check passes and the error comes on use

    def __repr__(self) -> str:
        sizes = {name: len(ds) for name, ds in self.datasets.items()}
        return f"ClientDatasets({sizes}, batch_size={self.batch_size})"


class RecordCount(Dataset):
    """A client's data set whose records live elsewhere (in its PySyft datasite's process): only its public
    record count is left here."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Any:
        raise TypeError("this client's records were handed over to its datasite; none are kept here")


def counts_only(datasets: Mapping[str, Dataset]) -> dict[str, RecordCount]:
    """Each data set replaced by its record count."""
    return {name: RecordCount(len(dataset)) for name, dataset in datasets.items()}


def eval_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    """Sequential loader; a TensorDataset is indexed a whole batch at a time (no per-sample collate)."""
    if isinstance(dataset, TensorDataset):
        batches = BatchSampler(SequentialSampler(dataset), batch_size, drop_last=False)
        return DataLoader(dataset, sampler=batches, batch_size=None)
    return DataLoader(dataset, batch_size=batch_size)


def split_among_clients(train: Dataset, names: Sequence[str], indices: Sequence) -> dict[str, Dataset]:
    """Client datasets from index shares; tensor data sets stay tensors (fast batch indexing)."""
    if isinstance(train, TensorDataset):
        return {name: TensorDataset(*(t[idx] for t in train.tensors)) for name, idx in zip(names, indices)}
    return {name: Subset(train, idx.tolist()) for name, idx in zip(names, indices)}


class FederatedDataModule(pl.LightningDataModule):
    """Splits a training set among named clients and serves a shared validation/test set.

    Args:
        source: ``mnist``, ``fashion_mnist`` or ``synthetic``; ignored when ``train`` is given.
        clients: client names, or a count (names ``client_0`` ...).
        partition: ``iid``, ``dirichlet`` (label skew with ``dirichlet_alpha``), ``shards`` (``shards_per_client``
            label shards each) or ``quantity`` (log-normal sizes with ``quantity_sigma``).
        dirichlet_alpha: Dirichlet concentration, > 0.
        shards_per_client: label shards per client under ``shards``.
        quantity_sigma: log-normal sigma of the client sizes under ``quantity``.
        drop_small_clients: leave out (logged) the clients that a partition leaves below ``batch_size`` records,
            instead of refusing them.
        batch_size: expected examples per client batch.
        eval_batch_size: examples per validation/test batch.
        root: directory for downloads.
        seed: seed of the partition (and of the MNIST fallback split).
        synthetic_sizes: (train, test) sizes of the ``synthetic`` source.
        train: your own training set (split among ``clients``) or a mapping client name -> data set
            (already federated: used as is).
        test: your own public evaluation set (required with ``train``), split into validation and test records.
        validation_fraction: share of the public evaluation set held out as the validation set (what
            ``validation_step``, EarlyStopping and ModelCheckpoint see), in (0, 1); the rest is the test set, which
            only ``trainer.test`` reads.
        num_classes: with your own data sets, the classes of their integer labels (``None``: the test set's
            largest label + 1); training labels outside them are refused at load.
    """

    def __init__(
        self,
        *,
        source: str = "mnist",
        clients: int | Sequence[str] = ("alice", "bob"),
        partition: str = "iid",
        dirichlet_alpha: float = 0.5,
        shards_per_client: int = 2,
        quantity_sigma: float = 1.0,
        drop_small_clients: bool = False,
        holdout_fraction: float = 0.0,
        validation_fraction: float = 0.1,
        batch_size: int = 128,
        eval_batch_size: int = 1024,
        root: str = "data",
        seed: int = 0,
        synthetic_sizes: tuple[int, int] = (2000, 500),
        features: str = "pixels",
        train: Dataset | Mapping[str, Dataset] | None = None,
        test: Dataset | None = None,
        num_classes: int | None = None,
    ):
        super().__init__()
        if (train is None) != (test is None):
            raise ConfigError("pass both `train` and `test` data sets, or neither (then `source` is loaded)")
        names = list(train) if isinstance(train, Mapping) else self._names(clients)
        # validated by the same typed configs that train.py uses
        DataConfig(
            name=source,
            root=root,
            eval_batch_size=eval_batch_size,
            features=features,
            validation_fraction=validation_fraction,
        )
        ClientConfig(
            count=len(names),
            names=names,
            partition=partition,
            dirichlet_alpha=dirichlet_alpha,
            shards_per_client=shards_per_client,
            quantity_sigma=quantity_sigma,
            holdout_fraction=holdout_fraction,
        )
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: must be >= 1")
        # settings live in attributes, not in hparams: LightningCLI and subclasses replace hparams
        self.source, self.partition, self.dirichlet_alpha = source, partition, dirichlet_alpha
        self.shards_per_client, self.quantity_sigma = shards_per_client, quantity_sigma
        self.drop_small_clients, self.holdout_fraction = drop_small_clients, holdout_fraction
        self.batch_size, self.eval_batch_size, self.root = batch_size, eval_batch_size, root
        self.validation_fraction = validation_fraction
        self.seed, self.synthetic_sizes, self.features = seed, tuple(synthetic_sizes), features
        self.save_hyperparameters(ignore=["train", "test", "clients", "num_classes"])  # for the loggers
        self.hparams["clients"] = names
        self.client_names = names
        self._given = (train, test) if train is not None else None
        self._given_classes = num_classes
        self.client_datasets: dict[str, Dataset] = {}
        self.client_holdouts: dict[str, Dataset] = {}
        self.test_set: Dataset | None = None
        """The public records only ``trainer.test`` reads."""
        self.validation_set: Dataset | None = None
        """The public records validation reads (held out from the evaluation set, disjoint from the test set)."""
        self.public_set: Dataset | None = None
        """The whole public evaluation set (validation and test records): the shape and scale of the data, for
        the sensitivity probe and the audit's canaries."""
        self.num_classes: int | None = None
        """Classes of the integer labels: the source's, or read from the public test set (``None`` for other
        targets)."""
        self.data_origin: str | None = None

    @staticmethod
    def _names(clients: int | Sequence[str]) -> list[str]:
        if isinstance(clients, int):
            if clients < 1:
                raise ConfigError(f"clients={clients}: need at least one client")
            return [f"client_{i}" for i in range(clients)]
        return list(clients)

    @classmethod
    def from_config(cls, data: DataConfig, client: ClientConfig, *, batch_size: int, seed: int) -> FederatedDataModule:
        """Builds the module from ``train.py``'s typed configs."""
        return cls(
            source=data.name,
            clients=client.client_names(),
            partition=client.partition,
            dirichlet_alpha=client.dirichlet_alpha,
            shards_per_client=client.shards_per_client,
            quantity_sigma=client.quantity_sigma,
            drop_small_clients=client.drop_small,
            holdout_fraction=client.holdout_fraction,
            batch_size=batch_size,
            eval_batch_size=data.eval_batch_size,
            validation_fraction=data.validation_fraction,
            root=data.root,
            seed=seed,
            synthetic_sizes=(data.synthetic_train_size, data.synthetic_test_size),
            features=data.features,
        )

    def load_source(self) -> DataSource:
        """Loads the configured source (see :mod:`fl_dp_lightning.data.sources`)."""
        if self.source == "mnist":
            return load_mnist(self.root, self.seed)
        if self.source == "fashion_mnist":
            return load_fashion_mnist(self.root, self.seed)
        return load_synthetic(*self.synthetic_sizes, seed=self.seed)

    def setup(self, stage: str | None = None) -> None:
        if self.public_set is not None:
            return
        if self._given is not None:
            train, self.test_set = self._given
            origin = "user-provided data sets"
            classes = self._given_classes or integer_classes(self.test_set)
        else:
            source = self.load_source()
            train, self.test_set, origin, classes = source.train, source.test, source.origin, source.num_classes
        if self.features != "pixels":  # each record mapped alone: what each client would do with its own records
            if isinstance(train, Mapping):
                train = {name: with_features(data, self.features) for name, data in train.items()}
            else:
                train = with_features(train, self.features)
            self.test_set = with_features(self.test_set, self.features)
            origin = f"{origin}, {self.features} features"
        if isinstance(train, Mapping):
            self.client_datasets = dict(train)
        else:
            self.client_datasets = split_among_clients(train, self.client_names, self._shares(train))
        if self.holdout_fraction:
            self._hold_out()
        if self.drop_small_clients:
            self._drop_small_clients()
        self.num_classes = classes
        check_labels(self.client_datasets, self.num_classes)
        self.data_origin = origin
        self.hparams["data_origin"] = origin
        self._split_validation()
        sizes = f"validation examples {len(self.validation_set)}, test examples {len(self.test_set)}"
        rank_zero_info(f"Data: {origin}; {describe_sizes(self.client_sizes())}; {sizes}")

    def _split_validation(self) -> None:
        """Holds ``validation_fraction`` of the public evaluation set out as the validation set, by a split seeded
        from the public seed alone (it reads no label)."""
        if len(self.test_set) < 2:
            raise ConfigError(
                f"the public evaluation set holds {len(self.test_set)} record(s): validation and test need at "
                "least one each; pass a larger test set"
            )
        test, validation = holdout_split(len(self.test_set), self.validation_fraction, self.seed * 7919 - 1)
        self.public_set = self.test_set
        self.test_set = Subset(self.public_set, test.tolist())
        self.validation_set = Subset(self.public_set, validation.tolist())

    def _hold_out(self) -> None:
        """Keeps ``holdout_fraction`` of each client's records out of its training set, seeded per client."""
        for index, (name, dataset) in enumerate(list(self.client_datasets.items())):
            parts = holdout_split(len(dataset), self.holdout_fraction, self.seed * 7919 + index)
            kept, held = split_among_clients(dataset, ["train", "holdout"], parts).values()
            self.client_datasets[name], self.client_holdouts[name] = kept, held

    def _drop_small_clients(self) -> None:
        """Leaves out the clients holding fewer records than the batch size (logged); refuses if none is left."""
        small = [name for name, ds in self.client_datasets.items() if len(ds) < self.batch_size]
        if len(small) == len(self.client_datasets):
            raise ConfigError(
                f"client.drop_small=true: every client holds fewer than batch_size={self.batch_size} records; "
                "lower the batch size or use fewer clients"
            )
        for name in small:
            del self.client_datasets[name]
            self.client_holdouts.pop(name, None)
        self.client_names = list(self.client_datasets)
        if small:
            rank_zero_info(f"client.drop_small: left out {len(small)} clients below the batch size: {small[:20]}")

    def hand_over_records(self) -> None:
        """Drops the clients' records from this process (they now live in their datasites' processes), keeping
        their counts, which checkpoints compare; the public test set stays."""
        self.client_datasets = counts_only(self.client_datasets)
        self._given = None

    def client_sizes(self) -> dict[str, int]:
        """Each client's record count (public under the replace-one guarantee)."""
        return {name: len(ds) for name, ds in self.client_datasets.items()}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint records of the data, so a resume on other data is refused."""
        return {"data_origin": self.data_origin, "client_sizes": self.client_sizes()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        diffs = [
            f"{key}: checkpoint {state.get(key)!r}, now {value!r}"
            for key, value in self.state_dict().items()
            if state.get(key) != value
        ]
        if diffs:
            raise ConfigError(
                "the checkpoint was trained on other data: " + "; ".join(diffs) + "; resume with the same data"
            )

    def _shares(self, train: Dataset) -> list:
        n = len(self.client_names)
        if self.partition == "iid":
            return iid_partition(len(train), n, self.seed)
        if self.partition == "quantity":
            return quantity_skew_partition(len(train), n, self.quantity_sigma, self.seed)
        if isinstance(train, TensorDataset):
            labels = train.tensors[1]
        else:
            labels = torch.as_tensor([int(train[i][1]) for i in range(len(train))])
        if self.partition == "shards":
            return shard_partition(labels, n, self.shards_per_client, self.seed)
        return dirichlet_partition(labels, n, self.dirichlet_alpha, self.seed)

    def train_dataloader(self) -> ClientDatasets:
        return ClientDatasets(
            self.client_datasets,
            self.batch_size,
            self.client_holdouts,
            public=self.public_set,
            num_classes=self.num_classes,
        )

    def val_dataloader(self) -> DataLoader:
        return eval_loader(self.validation_set, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return eval_loader(self.test_set, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """The shared test set (public), for ``trainer.predict(model, datamodule=...)``."""
        return eval_loader(self.test_set, self.eval_batch_size)


def _integer_labels(dataset: Dataset) -> Tensor | None:
    """The labels of a ``TensorDataset(inputs, integer labels)``, else ``None``."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        labels = dataset.tensors[1]
        if labels.dim() == 1 and not labels.is_floating_point() and labels.dtype != torch.bool:
            return labels
    return None


def integer_classes(test: Dataset) -> int | None:
    """The number of classes of a public test set of integer labels (its largest label + 1), else ``None``."""
    labels = _integer_labels(test)
    return None if labels is None or len(labels) == 0 else int(labels.max()) + 1


def check_labels(datasets: Mapping[str, Dataset], num_classes: int | None) -> None:
    """Refuses, before any training, a client whose integer labels fall outside ``[0, num_classes)``: every one
    of its steps would fail inside the loss, after privacy was spent."""
    if num_classes is None:
        return
    for name, dataset in datasets.items():
        labels = _integer_labels(dataset)
        if labels is not None and len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ConfigError(
                f"client {name!r} holds training labels outside [0, {num_classes}), the data's classes: relabel its "
                "data to those classes (or, with your own data sets, pass num_classes=...)"
            )


def describe_sizes(sizes: Mapping[str, int], listed: int = 10) -> str:
    """Client sizes for a log line: every client up to ``listed``, else count, min, median and max."""
    if len(sizes) <= listed:
        return f"client examples {dict(sizes)}"
    values = sorted(sizes.values())
    return (
        f"{len(values)} clients, examples per client min {values[0]}, median {values[len(values) // 2]}, "
        f"max {values[-1]}"
    )
