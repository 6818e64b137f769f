"""Tenant picklists (Autotask note types, publish values, statuses; Halo statuses), cached
per connection so a writeback does not re-read them on every call.

Bounded and timed: a worker serving thousands of tenants keeps at most MAX_ENTRIES, and a
tenant that edits its picklists sees the change within TTL_SECONDS. Shared by the worker's
threads; a miss is loaded outside the lock (two threads may both load once; harmless).

A load that failed is remembered for FAILURE_SECONDS: status names are a courtesy that the
providers do without, and a tenant whose field-information endpoint refuses us (permissions,
an outage) must not cost an extra call on every ticket read. A 429 is not remembered, it is
raised: the runner starts the connection's cooldown, and nothing calls that PSA meanwhile.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from models import settings
from providers.errors import PsaBadRequest, PsaError, PsaRateLimited
from providers.lru import LRU

MAX_ENTRIES = 512
FAILURE_SECONDS = 60.0


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


def ttl_seconds() -> float:
    """How long a tenant's picklists (statuses, note types) are used before reading them again."""
    return settings.number("PSA_PICKLIST_TTL_SECONDS", 600, minimum=0)


class PicklistCache:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._entries: LRU[dict[str, Picklist]] = LRU(max_entries, ttl=ttl_seconds)
        self._failures: LRU[PsaError] = LRU(max_entries, ttl=lambda: FAILURE_SECONDS)

    def get(self, key: str, load: Callable[[], dict[str, Picklist]], field: str) -> Picklist:
        lists = self._entries.get(key)
        if lists is None:
            failed = self._failures.get(key)
            if failed is not None:
                raise copy.copy(failed)  # a copy: each raise gets its own traceback
            try:
                lists = self._entries.put(key, load())  # loaded outside the lock
            except PsaRateLimited:
                raise
            except PsaError as err:
                self._failures.put(key, err.with_traceback(None))
                raise
        try:
            return lists[field]
        except KeyError:
            raise PsaBadRequest(f"the tenant's field information has no {field!r} picklist") from None

    def clear(self) -> None:
        self._entries.clear()
        self._failures.clear()

    def __len__(self) -> int:
        return len(self._entries)


PICKLISTS = PicklistCache()

__all__ = ["PICKLISTS", "Picklist", "PicklistCache"]
