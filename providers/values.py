"""Reading ids and timestamps out of a PSA's JSON, the same way for every provider: a value
that is not what it should be becomes None (the caller decides whether that is a protocol
error), never an exception from deep inside a parser."""
from __future__ import annotations

import datetime as dt
from typing import Any

from providers.errors import PsaProtocolError


def to_int(value: Any) -> int | None:
    # bool is an int in Python: a vendor's `true` is not id 1.
    try:
        return int(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON 1e400 is inf
        return None


def vendor_id(value: Any, what: str, operation: str) -> int:
    """An integer id in a PSA's reply, or PsaProtocolError: a malformed id is the PSA's
    fault, never our configuration's."""
    found = to_int(value)
    if found is None:
        raise PsaProtocolError(f"{what} had no integer id", operation=operation)
    return found


def parse_iso(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
