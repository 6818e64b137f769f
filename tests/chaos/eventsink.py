"""`celery -A tests.chaos.eventsink worker`: the production app, plus a recorder that
appends every job_finished / job_retry_scheduled event to $WRITEBACK_EVENT_LOG (one JSON
line each, O_APPEND), so a test can count alert-hook firings across worker processes,
kills and restarts."""
from __future__ import annotations

import json
import os
from typing import Any

from tasks import events
from worker.app import app

__all__ = ["app"]
_PATH = os.environ.get("WRITEBACK_EVENT_LOG")


def _recorder(name: str):
    def record(**payload: Any) -> None:
        line = json.dumps({"event": name, "pid": os.getpid(), "job_id": payload.get("job_id"),
                           "state": payload.get("state"), "attempts": payload.get("attempts")})
        fd = os.open(_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    record.__name__ = f"record_{name}"
    return record


if _PATH:
    for _name in ("job_finished", "job_retry_scheduled"):
        events.subscribe(_name, _recorder(_name))
