"""Input validation for every public entry point (enqueue API, tasks by name, CLI)."""
from __future__ import annotations

import enum
import re
import unicodedata
from typing import Any, TypeVar

from models.enums import JobKind, NoteVisibility
from tasks.errors import RequestError

E = TypeVar("E", bound=enum.Enum)

MAX_MARKDOWN_CHARS = 60_000
MAX_IDEMPOTENCY_KEY = 255
# Tabs and newlines are text; other C0/C1 controls are almost always a paste accident or
# an attack on a downstream renderer, and CW rejects some of them outright.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def is_status_id(value: Any) -> bool:
    """Whether a stored preference (JSON) is usable as a PSA status id: an integer above 0,
    not a bool, not a numeric string (the account's settings are checked as they are)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def positive_int(value: Any, field: str) -> int:
    # bool is an int subclass; True must not become ticket 1.
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        else:
            raise RequestError(f"{field} must be a positive integer, got {_describe(value)}", field=field)
    if value <= 0:
        raise RequestError(f"{field} must be a positive integer, got {value}", field=field)
    if value > 2**63 - 1:
        raise RequestError(f"{field} is out of range", field=field)
    return value


def markdown(value: Any, field: str = "markdown") -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"{field} is not valid UTF-8", field=field) from None
    if not isinstance(value, str):
        raise RequestError(f"{field} must be a string, got {_describe(value)}", field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{field} is not valid UTF-8 (lone surrogate characters)", field=field) from None
    if not value.strip():
        raise RequestError(f"{field} is empty: there is nothing to post", field=field)
    if len(value) > MAX_MARKDOWN_CHARS:
        raise RequestError(f"{field} is {len(value)} characters; the limit is {MAX_MARKDOWN_CHARS}", field=field)
    if m := _CONTROL.search(value):
        raise RequestError(f"{field} contains a control character (U+{ord(m.group()):04X}) at position {m.start()}",
                           field=field)
    return unicodedata.normalize("NFC", value.replace("\r\n", "\n"))


def choice(enum_cls: type[E], value: Any, field: str) -> E:
    """`value` as a member of `enum_cls`, or a RequestError that lists the allowed values."""
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum_cls)
        raise RequestError(f"{field} must be one of {allowed}, got {_describe(value)}", field=field) from None


def visibility(value: Any) -> NoteVisibility:
    return choice(NoteVisibility, value, "visibility")


def kind(value: Any) -> JobKind:
    return choice(JobKind, value, "kind")


def idempotency_key(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or not value.isprintable():
        raise RequestError("idempotency_key must be a non-empty printable string", field="idempotency_key")
    if len(value) > MAX_IDEMPOTENCY_KEY:
        raise RequestError(f"idempotency_key is longer than {MAX_IDEMPOTENCY_KEY} characters", field="idempotency_key")
    return value


def only_known(payload: Any, allowed: set[str], required: set[str]) -> dict[str, Any]:
    """Task payloads come from other codebases: reject typos instead of ignoring them."""
    if not isinstance(payload, dict):
        raise RequestError(f"arguments must be a JSON object, got {_describe(payload)}")
    unknown = sorted(set(payload) - allowed)
    if unknown:
        raise RequestError(f"unknown argument(s): {names(unknown)}; expected {', '.join(sorted(allowed))}")
    missing = sorted(required - set(payload))
    if missing:
        raise RequestError(f"missing required argument(s): {', '.join(missing)}", field=missing[0])
    return payload


def names(keys: Any, most: int = 10) -> str:
    """Argument names a sender chose, for an error message (the task's result, Flower, the
    log): at most `most`, each cut, so a name cannot carry a note or a megabyte into them."""
    shown = [(k if len(k) <= 40 else k[:39] + "…") for k in (str(k) for k in list(keys)[:most])]
    more = len(keys) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"
