"""Strings from outside (a PSA's status names and error messages, a ticket's text) made safe
to print on one line of a log or a terminal.

Providers strip control characters from what a PSA sends; this is the rendering side's own
guard, for every string it did not build itself: a newline inside a field could forge a log
line (`\\nALERT auth_failed ...`), an ESC could drive the operator's terminal.
"""
from __future__ import annotations

import re

# C0 (tab aside), DEL, C1, and the Unicode line and paragraph separators some viewers break on.
_CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r"}


def _escape(m: re.Match[str]) -> str:
    ch = m.group(0)
    return _NAMED.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def one_line(text: object) -> str:
    """`text` with every control character shown as an escape (`\\n`, `\\x1b`): printable,
    on one line, and visibly not what it was."""
    value = text if isinstance(text, str) else str(text)
    return _CONTROLS.sub(_escape, value) if _CONTROLS.search(value) else value
