"""OAuth2 access tokens, cached per connection and shared by a worker's threads.

A token is reused until shortly before it expires (MARGIN), fetched by one thread while
the others wait for it (no stampede on the token endpoint), and renewed at most once per
401 however many threads saw that 401 (`renew(old)` is a no-op when someone already
replaced `old`). Keys are hashed (they include the client secret); tokens are held only
here, and the cache is bounded for workers serving many tenants.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from providers.lru import LRU

MAX_ENTRIES = 512
MARGIN_SECONDS = 60.0  # renew this long before expiry (or at 90% of a short lifetime)

Fetch = Callable[[], tuple[str, float]]  # -> (access token, lifetime in seconds)


@dataclass
class _Entry:
    lock: threading.Lock = field(default_factory=threading.Lock)
    token: str | None = None
    expires_at: float = 0.0
    fetched: int = 0

    def __repr__(self) -> str:  # never show the token
        return f"_Entry(fetched={self.fetched}, expires_in={self.expires_at - time.monotonic():.0f}s)"


class TokenSource:
    def __init__(self, entry: _Entry, fetch: Fetch) -> None:
        self._entry, self._fetch = entry, fetch

    def get(self) -> str:
        e = self._entry
        token = e.token
        if token is not None and time.monotonic() < e.expires_at:
            return token
        with self._locked():
            if e.token is not None and time.monotonic() < e.expires_at:
                return e.token  # another thread fetched it while we waited
            return self._refresh()

    def renew(self, old: str) -> str:
        """After a 401 with `old`: fetch a new token unless another thread already did."""
        with self._locked():
            if self._entry.token is not None and self._entry.token != old:
                return self._entry.token
            return self._refresh()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The entry's lock, waited for at most as long as its holder's fetch may take (two
        calls: authinfo, then the token): a tenant whose auth server stalls holds its other
        threads no longer than a call of its own would."""
        from providers.http import call_deadline
        from providers.errors import PsaTransientError

        if not self._entry.lock.acquire(timeout=2 * call_deadline()):
            raise PsaTransientError("another thread's token request to this PSA did not finish in time",
                                    operation="token")
        try:
            yield
        finally:
            self._entry.lock.release()

    def _refresh(self) -> str:
        e = self._entry
        e.token, e.expires_at = None, 0.0
        token, lifetime = self._fetch()
        margin = min(MARGIN_SECONDS, lifetime * 0.1)
        e.token, e.expires_at, e.fetched = token, time.monotonic() + max(lifetime - margin, 0.0), e.fetched + 1
        return token


class TokenCache:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._entries: LRU[_Entry] = LRU(max_entries)

    def source(self, key_material: str, fetch: Fetch) -> TokenSource:
        key = hashlib.sha256(key_material.encode()).hexdigest()
        return TokenSource(self._entries.setdefault(key, _Entry), fetch)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


TOKENS = TokenCache()
