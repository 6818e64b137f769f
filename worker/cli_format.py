"""Pieces every CLI module prints with: the plain-text table and the JSON shapes of rows that
more than one command shows (alerts appear in `alerts list` and in `jobs show`). Imports no
other CLI module, so the command modules each depend on it and never on each other."""
from __future__ import annotations

import datetime as dt
from typing import Any

from models import Alert
from worker.safetext import one_line


def iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def alert_dict(a: Alert) -> dict[str, Any]:
    return {"id": a.id, "kind": a.kind, "job_id": a.job_id, "account_id": a.account_id, "provider": a.provider,
            "connection_id": a.connection_id, "ticket_id": a.ticket_id,
            "expected_status": [a.expected_status_id, a.expected_status_name],
            "observed_status": [a.observed_status_id, a.observed_status_name], "message": a.message,
            "created_at": iso(a.created_at), "resolved_at": iso(a.resolved_at), "resolution": a.resolution,
            "delivery_state": a.delivery_state, "delivery_attempts": a.delivery_attempts,
            "delivery_status_code": a.delivery_status_code, "delivery_error": a.delivery_error}


def table(headers: list[str], rows: list[list[Any]]) -> str:
    # Cells hold vendor strings (status names, PSA error messages): one line each, with no
    # control character reaching the operator's terminal raw (an ESC could drive it).
    cells = [[one_line(c) if c is not None else "-" for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])
