"""`BoundedCache`: a dict that keeps its most recently used entries; the ingress keeps cards and handles in it.

>>> cache = BoundedCache[str, int](2)
>>> cache["a"], cache["b"] = 1, 2
>>> cache.get("a"); cache["c"] = 3       # "b", least recently used, is dropped
>>> list(cache)
['a', 'c']
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedCache(OrderedDict[K, V], Generic[K, V]):
    """A dict that keeps its ``capacity`` most recently used entries (``get`` and setting count as use)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            msg = f"capacity must be >= 1, got {capacity}"
            raise ValueError(msg)
        super().__init__()
        self.capacity = capacity

    def get(self, key: K, default: V | None = None) -> V | None:  # type: ignore[override]
        """The value of ``key`` (now the most recently used), else ``default``."""
        if key not in self:
            return default
        self.move_to_end(key)
        return self[key]

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)
