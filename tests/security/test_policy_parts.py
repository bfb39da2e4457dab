"""The policy engine's decision cache (LRU) on its own (the batcher's tests are in test_policy_batch_units.py)."""

from __future__ import annotations

import pytest

from stitchwork.security.policy.cache import LruCache

# -- LruCache ------------------------------------------------------------------------------------------------


def test_the_cache_keeps_at_most_size_entries_dropping_the_least_recently_used() -> None:
    cache: LruCache[str, int] = LruCache(2)
    assert cache.enabled and len(cache) == 0
    cache.put_many([("a", 1), ("b", 2)])
    assert len(cache) == 2
    assert cache.get("a") == 1  # a is now the most recently used: b goes first
    cache.put_many([("c", 3)])
    assert len(cache) == 2
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)


def test_a_batch_larger_than_the_cache_keeps_its_newest_entries() -> None:
    cache: LruCache[int, int] = LruCache(3)
    cache.put_many((i, i * 10) for i in range(5))
    assert len(cache) == 3
    assert [cache.get(i) for i in range(5)] == [None, None, 20, 30, 40]


def test_storing_a_present_key_replaces_its_value_without_growing() -> None:
    cache: LruCache[str, int] = LruCache(2)
    cache.put_many([("a", 1), ("b", 2), ("a", 9)])
    assert len(cache) == 2 and cache.get("a") == 9 and cache.get("b") == 2


def test_exactly_size_entries_are_all_kept() -> None:
    cache: LruCache[int, str] = LruCache(4)
    cache.put_many((i, str(i)) for i in range(4))
    assert len(cache) == 4 and [cache.get(i) for i in range(4)] == ["0", "1", "2", "3"]


@pytest.mark.parametrize("size", [0, -5])
def test_a_cache_of_size_zero_or_less_remembers_nothing(size: int) -> None:
    cache: LruCache[str, int] = LruCache(size)
    assert cache.size == 0 and not cache.enabled
    cache.put_many([("a", 1)])
    assert len(cache) == 0 and cache.get("a") is None


def test_a_cache_of_size_one_is_enabled() -> None:
    cache: LruCache[str, int] = LruCache(1)
    assert cache.enabled
    cache.put_many([("a", 1)])
    assert cache.get("a") == 1


def test_clear_forgets_everything() -> None:
    cache: LruCache[str, int] = LruCache(3)
    cache.put_many([("a", 1), ("b", 2)])
    cache.clear()
    assert len(cache) == 0 and cache.get("a") is None
