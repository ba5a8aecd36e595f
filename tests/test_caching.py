"""The shared vocabulary caches: least-recently-used eviction, per-entry reuse, weight digests."""

import pytest
import torch
from torch import nn

from ovseg.caching import ExpiringEntry, LruCache, WeightsFingerprint


def test_the_least_recently_used_entry_is_evicted_first():
    cache = LruCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the oldest
    cache.put("c", 3)
    assert "b" not in cache
    assert (cache.get("a"), cache.get("c"), len(cache)) == (1, 3, 2)
    assert cache.get("b") is None


def test_a_size_bound_evicts_by_total_size_and_keeps_the_newest_entry():
    cache = LruCache(max_size=10, size=len)
    cache.put("a", "x" * 4)
    cache.put("b", "x" * 4)
    cache.put("c", "x" * 4)
    assert ("a" in cache, "b" in cache, "c" in cache) == (False, True, True)
    assert cache.total_size == 8
    cache.put("big", "x" * 30)  # over the bound on its own: kept, everything older goes
    assert list(cache._entries) == ["big"]
    assert cache.total_size == 30
    cache.put("big", "x")  # replacing an entry replaces its size
    assert cache.total_size == 1


def test_rows_encode_only_missing_keys_in_one_call_and_keep_the_requested_ones():
    calls = []

    def encode(keys):
        calls.append(list(keys))
        return [key.upper() for key in keys]

    cache = LruCache(3)
    assert cache.rows(["a", "b", "a"], encode) == ["A", "B", "A"]
    assert cache.rows(["b", "c", "d", "e"], encode) == ["B", "C", "D", "E"]
    assert calls == [["a", "b"], ["c", "d", "e"]]
    # Four keys asked for at once stay, over the bound; the older "a" went.
    assert sorted(cache._entries) == ["b", "c", "d", "e"]
    cache.rows(["f"], encode)
    assert sorted(cache._entries) == ["d", "e", "f"]
    with pytest.raises(ValueError, match="2 values for 1 keys"):
        cache.rows(["g"], lambda keys: ["G", "H"])


def test_a_size_bound_needs_a_size_function():
    with pytest.raises(ValueError, match="size function"):
        LruCache(max_size=3)


def test_an_expiring_entry_is_computed_again_every_max_uses_calls_and_on_a_new_key():
    computed = []

    def compute(key):
        computed.append(key)
        return len(computed)

    entry = ExpiringEntry()
    values = [entry.get("a", lambda: compute("a"), max_uses=3) for _ in range(7)]
    assert values == [1, 1, 1, 2, 2, 2, 3]
    assert entry.get("b", lambda: compute("b"), max_uses=3) == 4  # a new key: computed at once
    assert entry.get("a", lambda: compute("a"), max_uses=3) == 5  # only the last key is kept
    entry.clear()
    assert entry.get("a", lambda: compute("a"), max_uses=3) == 6
    assert [entry.get("a", lambda: compute("a"), max_uses=1) for _ in range(2)] == [7, 8]
    assert computed == ["a", "a", "a", "b", "a", "a", "a", "a"]


def test_the_fingerprint_changes_with_the_weights_and_only_then():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    fingerprint = WeightsFingerprint()
    first = fingerprint(layer)
    assert len(first) == 16 and first == fingerprint(layer)
    with torch.no_grad():
        layer.weight[0, 0] += 1
    changed = fingerprint(layer)
    assert changed != first
    copy = nn.Linear(3, 2)
    copy.load_state_dict(layer.state_dict())
    assert WeightsFingerprint()(copy) == changed  # the bytes decide, not the object
