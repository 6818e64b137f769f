"""Tenant picklists (Autotask note types, publish values, statuses; Halo statuses), cached
per connection so a writeback does not re-read them on every call.

Bounded and timed: a worker serving thousands of tenants keeps at most MAX_ENTRIES, and a
tenant that edits its picklists sees the change within TTL_SECONDS. Shared by the worker's
threads; a miss is loaded outside the lock (two threads may both load once; harmless).
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from providers.errors import PsaBadRequest

MAX_ENTRIES = 512


@dataclass(frozen=True)
class Picklist:
    name: str
    values: dict[int, tuple[str, bool]]  # id -> (label, active)

    def label(self, value: int) -> str | None:
        entry = self.values.get(value)
        return entry[0] if entry else None

    def first_of(self, labels: Iterable[str], *, what: str) -> int:
        """The id of the first active value whose label matches (case-insensitively)."""
        by_label = {label.strip().lower(): v for v, (label, active) in self.values.items() if active}
        for wanted in labels:
            if (v := by_label.get(wanted.lower())) is not None:
                return v
        raise PsaBadRequest(f"the tenant's {self.name} picklist has no active {what} labelled "
                            f"{' or '.join(repr(x) for x in labels)}; set its id in the account's preferences")


class PicklistCache:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._entries: OrderedDict[str, tuple[float, dict[str, Picklist]]] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_entries

    def get(self, key: str, load: Callable[[], dict[str, Picklist]], field: str) -> Picklist:
        lists = self._fresh(key)
        if lists is None:
            lists = load()
            with self._lock:
                self._entries[key] = (time.monotonic(), lists)
                self._entries.move_to_end(key)
                while len(self._entries) > self._max:
                    self._entries.popitem(last=False)
        try:
            return lists[field]
        except KeyError:
            raise PsaBadRequest(f"the tenant's field information has no {field!r} picklist") from None

    def _fresh(self, key: str) -> dict[str, Picklist] | None:
        ttl = float(os.environ.get("PSA_PICKLIST_TTL_SECONDS", "600"))
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or time.monotonic() - entry[0] > ttl:
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


PICKLISTS = PicklistCache()

__all__ = ["PICKLISTS", "Picklist", "PicklistCache"]
