"""What Lightning iterates as the training loader: one round's batches, client after client."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

WHOLE_ROUND = "whole round"
"""The one batch of a vectorized round (the engine draws the clients' batches itself)."""


class Rounds(Protocol):
    def round_length(self) -> int | None: ...

    def round_batches(self) -> Iterator[Any]: ...


class RoundIterable:
    """The round's batches per ``iter``; its length is the round's, when every round has the same."""

    def __init__(self, strategy: Rounds):
        self.strategy = strategy

    def __len__(self) -> int:
        length = self.strategy.round_length()
        if length is None:
            raise TypeError("rounds differ in length when sampled clients differ in size")
        return length

    def __iter__(self) -> Iterator[Any]:
        return self.strategy.round_batches()


def followed_by(closure: Any, after: Any) -> Any:
    """``closure``, then ``after()``; returns the closure's result."""

    def run() -> Any:
        result = closure()
        after()
        return result

    return run
