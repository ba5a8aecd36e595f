"""The in-memory caches of vocabulary encodings: text embeddings, visual prompts, prompted names.

Encoding a vocabulary is the expensive part of a new query (80 templates per class through a text
tower, or a bank of visual prompts through an image tower), and a demo user changes one name at a
time. Two kinds of cache serve that, both least-recently-used:

- a whole vocabulary's result, keyed by everything it depends on (:class:`LruCache`);
- one entry per class or name, so that a vocabulary sharing classes with an earlier one encodes
  only its new classes (:meth:`LruCache.rows`).

While a text tower trains its encodings go stale at every step; a method that accepts some
staleness keeps one for a number of calls (:class:`ExpiringEntry`).

Keys hold everything an entry depends on: the weights (through :class:`WeightsFingerprint` or the
tensors' version counters), the templates, the device, the dtype. A cache never answers a call
that gradients must flow through; callers skip it then.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Generic, TypeVar

import torch
from torch import Tensor, nn

Value = TypeVar("Value")


class LruCache(Generic[Value]):
    """A mapping that keeps its most recently used entries.

    Entries are evicted, oldest first, while there are more than ``max_entries`` of them or their
    total ``size`` exceeds ``max_size``.
    """

    def __init__(
        self,
        max_entries: int | None = None,
        *,
        max_size: int | None = None,
        size: Callable[[Value], int] | None = None,
    ) -> None:
        """
        Arguments:
            max_entries: the most entries kept (None: no limit on the count).
            max_size: the most total ``size`` kept (None: no limit on the size).
            size: an entry's size (e.g. ``Tensor.numel``); needed with ``max_size``.
        """
        if max_size is not None and size is None:
            raise ValueError("An LruCache with max_size needs a size function.")
        self.max_entries = max_entries
        self.max_size = max_size
        self._size = size
        self._entries: OrderedDict[Hashable, Value] = OrderedDict()
        self._total = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def total_size(self) -> int:
        """The summed ``size`` of the entries (0 without a size function)."""
        return self._total

    def get(self, key: Hashable) -> Value | None:
        """The entry of ``key`` (now the most recently used), or None."""
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key: Hashable, value: Value) -> Value:
        """Store ``value`` as the most recently used entry, evict what is over the limits, and
        return ``value``."""
        self._insert(key, value)
        self._evict(protected=1)
        return value

    def rows(self, keys: Sequence[Hashable], encode: Callable[[list], Iterable[Value]]) -> list:
        """The entries of ``keys`` in order, computing the missing ones in one call.

        Arguments:
            keys: the entries wanted (repeats allowed).
            encode: the missing keys, in first-seen order → their values, in the same order.

        None of ``keys`` is evicted by this call, even beyond the limits.
        """
        missing = list(dict.fromkeys(key for key in keys if key not in self._entries))
        if missing:
            values = list(encode(missing))
            if len(values) != len(missing):
                raise ValueError(f"encode returned {len(values)} values for {len(missing)} keys.")
            for key, value in zip(missing, values, strict=True):
                self._insert(key, value)
        rows = []
        for key in keys:
            self._entries.move_to_end(key)
            rows.append(self._entries[key])
        self._evict(protected=len(set(keys)))
        return rows

    def clear(self) -> None:
        self._entries.clear()
        self._total = 0

    def _insert(self, key: Hashable, value: Value) -> None:
        if key in self._entries:
            self._total -= self._measure(self._entries.pop(key))
        self._entries[key] = value
        self._total += self._measure(value)

    def _measure(self, value: Value) -> int:
        return self._size(value) if self._size is not None else 0

    def _evict(self, *, protected: int) -> None:
        """Evict the oldest entries while over a limit, keeping the ``protected`` newest."""
        while len(self._entries) > protected and (
            (self.max_entries is not None and len(self._entries) > self.max_entries)
            or (self.max_size is not None and self._total > self.max_size)
        ):
            _, evicted = self._entries.popitem(last=False)
            self._total -= self._measure(evicted)


class ExpiringEntry(Generic[Value]):
    """One cached value, computed again when its key changes or once it has answered
    ``max_uses`` calls."""

    def __init__(self) -> None:
        self._key: Hashable | None = None
        self._value: Value | None = None
        self._uses = 0

    def get(self, key: Hashable, compute: Callable[[], Value], *, max_uses: int) -> Value:
        """The value of ``key``: the cached one, or ``compute()`` when there is none for
        ``key`` or it has been returned ``max_uses`` times (≤ 1: every call computes)."""
        if self._value is None or key != self._key or self._uses >= max_uses:
            self._key, self._value, self._uses = key, compute(), 0
        self._uses += 1
        return self._value

    def clear(self) -> None:
        self._key, self._value, self._uses = None, None, 0


class WeightsFingerprint:
    """A digest of a module's weights for cache keys, hashed again only when a tensor changed
    (an optimiser step or ``load_state_dict`` bumps its version counter)."""

    def __init__(self) -> None:
        self._versions: tuple | None = None
        self._digest = ""

    def __call__(self, module: nn.Module) -> str:
        """The first 16 hex digits of the SHA-256 of ``module``'s state dict (names and bytes)."""
        state = module.state_dict()
        versions = tuple((t.data_ptr(), t._version) for t in state.values())
        if versions != self._versions:
            digest = hashlib.sha256()
            for name, tensor in state.items():
                digest.update(name.encode())
                digest.update(_bytes(tensor))
            self._versions, self._digest = versions, digest.hexdigest()[:16]
        return self._digest


def _bytes(tensor: Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
