"""A bounded, thread-safe least-recently-used map: the engine's memory of decisions."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """Remembers up to ``size`` values; reading one makes it the most recently used, the least is dropped first.

    A size of 0 remembers nothing. Storing a key that is already present replaces its value and leaves its place.
    """

    def __init__(self, size: int) -> None:
        """A cache of at most ``size`` entries (negative counts as 0)."""
        self.size = max(0, size)
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def enabled(self) -> bool:
        """Whether the cache remembers anything at all."""
        return self.size > 0

    def get(self, key: K) -> V | None:
        """The value stored for ``key``, now the most recently used, or None."""
        if not self.size:
            return None
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put_many(self, items: Iterable[tuple[K, V]]) -> None:
        """Stores the values, then drops the least recently used ones beyond the size."""
        if not self.size:
            return
        with self._lock:
            for key, value in items:
                self._entries[key] = value
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forgets everything."""
        with self._lock:
            self._entries.clear()
