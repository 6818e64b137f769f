"""Vendor strings cleaned at the provider boundary, before anything stores, logs or shows them.

A PSA (or anything between us and it) can put newlines, ESC sequences or bidi overrides in an
error message or a status name: a newline forges a second log line, ESC drives a terminal
that prints `jobs show`. Escaping for a particular renderer (Slack, HTML) is the renderer's
job; removing control characters is ours, once, here.
"""
from __future__ import annotations

import re
from typing import Any

# Column widths of what providers return (models.limits clamps again before any write).
STATUS_NAME_LIMIT = 200
NOTE_ID_LIMIT = 64

# C0 and C1 controls (DEL included); tab, newline and carriage return are text in a note.
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# In a one-line value every line break (including U+2028/2029) becomes one space.
_BREAKS = re.compile(r"[\t\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]+")
# Bidi embeddings, overrides and isolates: they reorder what a terminal or log viewer shows.
_BIDI = re.compile(r"[\u202a-\u202e\u2066-\u2069]")


def clean_line(value: Any, limit: int = 300) -> str:
    """A vendor string for one line (error message, vendor code, status name): controls
    removed, line breaks folded to spaces, clamped to `limit` characters."""
    text = _BIDI.sub("", _CONTROLS.sub("", _BREAKS.sub(" ", str(value)))).strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


def clean_optional(value: Any, limit: int = 300) -> str | None:
    return None if value is None else clean_line(value, limit)


def clean_text(value: Any) -> str:
    """Multi-line vendor text (a note's text): controls removed, tabs and line breaks kept.
    Our own note markdown never holds these controls (tasks.validation refuses them), so
    cleaning what the PSA returns cannot make our own note look like someone else's."""
    return _CONTROLS.sub("", str(value))
