"""Weights derived from a model's parameters (fused, folded), rebuilt only when a parameter changed.

The lean forwards (the target's `TextStack`, the drafter's lean step) read concatenations of the modules'
weights (QKV, gate/up) so that one matmul does the work of several. The modules stay the one definition of
the weights: a `DerivedCache` hands back what it built from them last time while every source tensor still
holds the same data at the same version, and builds again otherwise. A parameter moved or cast (`.to()`:
new storage behind the same Parameter) or written in place (an optimizer step, `load_state_dict`: its
`_version` bumps) is a change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


class DerivedCache(Generic[T]):
    """One derived value and the state of the tensors it was built from."""

    def __init__(self) -> None:
        self._key: list[tuple[int, int]] | None = None
        self._value: T | None = None

    def get(self, sources: Sequence[torch.Tensor], build: Callable[[], T]) -> T:
        """The value `build()` made from `sources`, built again when any of them changed since."""
        key = [(t.data_ptr(), t._version) for t in sources]  # a list comprehension: the cheapest walk
        if self._value is None or key != self._key:
            self._value, self._key = build(), key
        return self._value
