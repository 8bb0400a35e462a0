"""Dirac canaries for the white-box one-run audit (Nasr et al. 2023; Steinke, Nasr and Jagielski 2023).

A Dirac canary is a record an adversary could craft in the white-box threat model: its gradient is zero except in
one coordinate of the trained parameters, where it is ``+norm`` (coin true) or ``-norm`` (coin false). Two runs that
differ in one coin differ in one record replaced, within the clip norm after clipping: the replace-one adjacency
the accountants state, at its full sensitivity. Each step samples each canary as DP-SGD samples a record (with the
client's sample rate, from the canaries' own secret stream); the engines add the sampled canaries' gradients to the
client's per-example gradients, where clipping, noise and accounting treat them as any record. A canary's score,
read from the released model and the public initial model alone, is how far its coordinate fell.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class DiracCanaries:
    """``count`` Dirac canaries over a model's trained parameters (``shapes``, in the module's order)."""

    shapes: dict[str, torch.Size]
    """The trained parameters' names and shapes, in the order their coordinates are numbered."""
    positions: Tensor
    """(count,) distinct coordinates of the parameters flattened and concatenated in ``shapes``' order."""
    coins: Tensor
    """(count,) bool, each true with probability 1/2: the sign of the canary's gradient."""
    norm: float
    """Each canary gradient's L2 norm before clipping (gradient units)."""
    generator: torch.Generator = field(repr=False)
    """The secret stream that samples the canaries into steps."""

    def __len__(self) -> int:
        return len(self.coins)

    def sample(self, sample_rate: float) -> Tensor:
        """The canaries one step includes: each independently with probability ``sample_rate``."""
        return torch.nonzero(torch.rand(len(self), generator=self.generator) < sample_rate).flatten()

    def _values(self, included: Tensor) -> Tensor:
        return torch.where(self.coins[included], self.norm, -self.norm)

    def _by_parameter(self, included: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Per parameter: which of ``included`` fall in it (rows) and their flat indices within it."""
        out, start = {}, 0
        positions = self.positions[included]
        for name, shape in self.shapes.items():
            inside = (positions >= start) & (positions < start + shape.numel())
            out[name] = torch.nonzero(inside).flatten(), positions[inside] - start
            start += shape.numel()
        return out

    def per_example(self, included: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The ``included`` canaries' gradients as per-example rows ``[len(included), *shape]`` per parameter,
        on ``like``'s devices and dtypes, for the engine to clip as it clips its records'."""
        values = self._values(included)
        out = {}
        for name, (rows, index) in self._by_parameter(included).items():
            ref = like[name]
            grad = ref.new_zeros((len(included), self.shapes[name].numel()))
            grad[rows.to(ref.device), index.to(ref.device)] = values[rows].to(ref)
            out[name] = grad.view(len(included), *self.shapes[name])
        return out

    def summed(self, included: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The ``included`` canaries' gradients summed per parameter, unclipped (as without DP)."""
        values = self._values(included)
        out = {}
        for name, (rows, index) in self._by_parameter(included).items():
            ref = like[name]
            grad = ref.new_zeros(self.shapes[name].numel())
            grad[index.to(ref.device)] = values[rows].to(ref)  # positions are distinct: no two canaries collide
            out[name] = grad.view(self.shapes[name])
        return out

    def scores(self, initial: Mapping[str, Tensor], released: Mapping[str, Tensor]) -> Tensor:
        """How far each canary's coordinate fell from ``initial`` to ``released`` (high: coin true, as descent
        moves a coordinate against its gradient)."""
        fall = [(initial[n].float().cpu() - released[n].detach().float().cpu()).flatten() for n in self.shapes]
        return torch.cat(fall)[self.positions]


def draw_dirac_canaries(
    count: int, shapes: Mapping[str, torch.Size], norm: float, seed: int | None = None
) -> DiracCanaries:
    """``count`` Dirac canaries at distinct random coordinates of parameters shaped ``shapes``, with fair coins
    and a sampling stream; secret unless ``seed`` (tests only) fixes them."""
    shapes = {name: torch.Size(shape) for name, shape in shapes.items()}
    total = sum(shape.numel() for shape in shapes.values())
    if count > total:
        raise ValueError(f"{count} Dirac canaries need as many coordinates; the trained parameters have {total}")
    generator = torch.Generator().manual_seed(secrets.randbits(62) if seed is None else seed)
    positions = torch.randperm(total, generator=generator)[:count]
    coins = torch.rand(count, generator=generator) < 0.5
    return DiracCanaries(shapes, positions, coins, norm, generator)
