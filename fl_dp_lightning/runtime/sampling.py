"""Which records form each batch of a client: Poisson sampling (what DP accounting assumes) or shuffling."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import BatchSampler, Dataset, RandomSampler, TensorDataset, default_collate


def poisson_steps_per_epoch(sample_rate: float) -> int:
    """Steps that make one expected pass over the data: ``int(1 / sample_rate)``, as Opacus counts it."""
    return int(1 / sample_rate)


def poisson_batches(
    num_examples: int, sample_rate: float, steps: int, generator: torch.Generator
) -> Iterator[list[int]]:
    """``steps`` batches, each holding every record independently with probability ``sample_rate``."""
    return iter(
        UniformWithReplacementSampler(
            num_samples=num_examples, sample_rate=sample_rate, generator=generator, steps=steps
        )
    )


def shuffled_batches(
    num_examples: int, batch_size: int, epochs: int, generator: torch.Generator
) -> Iterator[list[int]]:
    """``epochs`` reshuffled passes in full batches (the last partial batch dropped), like a shuffling DataLoader."""
    sampler = BatchSampler(RandomSampler(range(num_examples), generator=generator), batch_size, drop_last=True)
    for _ in range(epochs):
        yield from sampler


def on_device(datasets: Mapping[str, Dataset], device: torch.device) -> dict[str, Dataset]:
    """The tensor data sets moved to ``device`` once, when they fit (on a GPU: in half of its free memory), so that
    batches are indexed where they train and Lightning's per-batch transfer finds nothing to move; other data sets
    are returned as they are."""
    tensors = [t for d in datasets.values() if isinstance(d, TensorDataset) for t in d.tensors]
    if not tensors or all(t.device == device for t in tensors):
        return dict(datasets)
    size = sum(t.numel() * t.element_size() for t in tensors)
    if device.type == "cuda" and size > torch.cuda.mem_get_info(device)[0] // 2:
        return dict(datasets)
    return {
        name: TensorDataset(*(t.to(device) for t in d.tensors)) if isinstance(d, TensorDataset) else d
        for name, d in datasets.items()
    }


def take_batch(dataset: Dataset, indices: Sequence[int]) -> Any:
    """The batch of ``dataset`` at ``indices``; an empty index list gives tensors with zero rows."""
    if isinstance(dataset, TensorDataset):
        idx = torch.as_tensor(indices, dtype=torch.long, device=dataset.tensors[0].device)
        return tuple(t[idx] for t in dataset.tensors)
    if len(indices) == 0:
        # shape of the batch from one record, then keep none of its rows
        return _first_rows(default_collate([dataset[0]]), 0)
    return default_collate([dataset[i] for i in indices])


def _first_rows(batch: Any, n: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, dict):
        return {k: _first_rows(v, n) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_first_rows(v, n) for v in batch)
    return batch


def same_format(dataset: Dataset, template: Any) -> bool:
    """Whether ``dataset``'s batches have the structure, trailing shapes and dtypes of ``template`` (a batch)."""
    if len(dataset) == 0:
        return False
    try:
        batch = take_batch(dataset, [0])
    except Exception:  # a data set in another format
        return False
    return _structure(batch) == _structure(template)


def _structure(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return ("tensor", tuple(batch.shape[1:]), batch.dtype)
    if isinstance(batch, dict):
        return {k: _structure(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return [_structure(v) for v in batch]
    return type(batch).__name__


def call_training_step(module: Any, batch: Any) -> Any:
    """``module.training_step`` called as Lightning calls it: with ``batch_idx`` where its signature takes one."""
    if is_param_in_hook_signature(module.training_step, "batch_idx", min_args=2):
        return module.training_step(batch, 0)
    return module.training_step(batch)
