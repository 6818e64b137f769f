"""A small thread-safe LRU map: what the per-connection caches of a worker serving thousands
of tenants share (Halo tokens, Autotask/Halo picklists). At most `max_entries`, the least
recently used out first; with `ttl`, an entry older than ttl() seconds is not returned."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class LRU(Generic[V]):
    def __init__(self, max_entries: int, ttl: Callable[[], float] | None = None) -> None:
        self._entries: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_entries
        self._ttl = ttl

    def get(self, key: str) -> V | None:
        """The entry (now the most recently used), or None when absent or expired."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or (self._ttl is not None and time.monotonic() - entry[0] > self._ttl()):
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: str, value: V) -> V:
        with self._lock:
            self._add(key, value)
        return value

    def setdefault(self, key: str, make: Callable[[], V]) -> V:
        """The fresh entry under `key`, or a new one from make() (under the lock: keep it cheap)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and (self._ttl is None or time.monotonic() - entry[0] <= self._ttl()):
                self._entries.move_to_end(key)
                return entry[1]
            value = make()
            self._add(key, value)
            return value

    def _add(self, key: str, value: V) -> None:
        self._entries[key] = (time.monotonic(), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:  # the values' own reprs (a Halo token entry hides its token)
        with self._lock:
            return f"LRU({ {k: v for k, (_, v) in self._entries.items()} !r})"
