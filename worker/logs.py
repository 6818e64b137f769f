"""Structured logs: every line about a job carries job id, Celery task id, account,
provider and ticket, as JSON (LOG_FORMAT=json) or as a `key=value` suffix on Celery's text.

The context lives in a ContextVar: under the threads pool each task runs in its own thread,
so each thread sees its own job. worker.signals binds it at task_prerun and clears it at
task_postrun; a filter on every handler copies it onto the records, so the runner's own
lines (`claimed job 12`) gain the fields without the runner knowing about any of this.

What never reaches a line: the JSON formatter writes an allow-list of fields, never the
record's whole __dict__ (Celery passes the task's kwargs, note markdown included, as
`extra={"data": ...}` on its "received" line), and a last-resort scrubber blanks anything
shaped like an Authorization header value. A database error's text (it can quote a row,
note markdown included) is never printed: a traceback names its type and SQLSTATE only.
A line is one line: in the text format, control characters in the message, the
`key=value` pairs and an exception's message are escaped (`\n`), so a vendor's message
cannot forge a line of its own (`ALERT auth_failed ...`).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import threading
import traceback
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from worker.safetext import one_line

CONTEXT_FIELDS = ("job_id", "task_id", "task_name", "account_id", "provider", "ticket_id")
_JOB_FIELDS = ("job_id", "account_id", "provider", "ticket_id")
# Attributes our code passes with `extra=` that belong in a structured line (an allow-list).
EXTRA_FIELDS = ("step", "attempt", "note_id", "operation", "http_status", "seconds", "state", "outcome", "kind",
                "connection_id", "alert_id", "alert_kind", "expected_status_id", "observed_status_id",
                "delivery")

_context: ContextVar[dict[str, Any] | None] = ContextVar("psa_writeback_log_context", default=None)
_resolving = threading.local()
_job_resolver: Callable[[int], dict[str, Any] | None] | None = None

# Anything shaped like a credential: an HTTP auth header value, or key=value / "key": "value"
# for the names we use for secrets.
_SECRET = re.compile(r"(?i)\b(basic|bearer)\s+[A-Za-z0-9+/=._~-]{8,}"
                     r"|((?:private|public)_?key|password|secret|authorization)(['\"]?\s*[:=]\s*['\"]?)"
                     r"(?:(?:basic|bearer)\s+)?[^\s'\",}]+")


# Every match of _SECRET contains one of these words (its literal alternatives).
_SECRET_WORDS = ("basic", "bearer", "key", "password", "secret", "authorization")


def may_hold_secret(text: str) -> bool:
    """False only if _SECRET cannot match `text`: no match lacks one of _SECRET_WORDS, and in
    ASCII text the pattern's case-insensitive matching is ASCII's, which a lower-case copy
    shows. Any other text is left to the pattern (its case-insensitive matching also pairs
    letters like `s` with non-ASCII ones). The pattern costs ~20 us on a typical line; this
    check about 1, and almost no line names any of the words."""
    if not text.isascii():
        return True
    low = text.lower()
    return any(word in low for word in _SECRET_WORDS)


def bind(**values: Any) -> None:
    """Add fields to this thread's log context (None values are ignored)."""
    current = dict(_context.get() or {})
    current.update({k: v for k, v in values.items() if v is not None})
    _context.set(current)


def clear() -> None:
    _context.set(None)


def set_job_resolver(fn: Callable[[int], dict[str, Any] | None] | None) -> None:
    """fn(job_id) -> {account_id, provider, ticket_id}: fills in a line that names a job its
    task's context does not know and carries no account of its own. Only that line: a
    claimed job's context is bound by the claim (worker.signals, job_claimed)."""
    global _job_resolver
    _job_resolver = fn


def scrub(text: str) -> str:
    def _blank(m: re.Match[str]) -> str:
        return f"{m.group(1)} [redacted]" if m.group(1) else f"{m.group(2)}{m.group(3)}[redacted]"
    return _SECRET.sub(_blank, text)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _context.get() or {}
        job_id = getattr(record, "job_id", None)
        if job_id is not None and ctx.get("job_id") != job_id:
            # Another job than the task's (or a task without one): the task's job fields do
            # not belong on this line. A line that brings its own account (every alert line)
            # needs no lookup; any other is looked up for this record only: the task's
            # context stays as it is, so its next lines are not stamped with this job.
            ctx = {k: v for k, v in ctx.items() if k not in _JOB_FIELDS}
            if getattr(record, "account_id", None) is None:
                ctx.update(self._resolve(job_id))
        for name in CONTEXT_FIELDS:
            if getattr(record, name, None) is None and ctx.get(name) is not None:
                setattr(record, name, ctx[name])
        message = record.getMessage()
        if may_hold_secret(message) and _SECRET.search(message):
            record.msg, record.args = scrub(message), None
        return True

    @staticmethod
    def _resolve(job_id: Any) -> dict[str, Any]:
        if _job_resolver is None or getattr(_resolving, "active", False):
            return {}
        _resolving.active = True  # the lookup may log (SQLAlchemy); never recurse into it
        try:
            found = _job_resolver(int(job_id)) or {}
        except Exception:
            found = {}
        finally:
            _resolving.active = False
        return dict(found)


def format_exception(exc: BaseException | None) -> str:
    """A traceback, with each exception's message on one line (escaped) and a database
    error's message replaced by its type and SQLSTATE (models.db.describe_error)."""
    from models.db import describe_error, is_db_error

    chain: list[tuple[BaseException, str]] = []
    link = ""
    while exc is not None and all(exc is not seen for seen, _ in chain):
        chain.append((exc, link))
        if exc.__cause__ is not None:
            exc, link = exc.__cause__, "The above exception was the direct cause of the following exception:"
        elif exc.__context__ is not None and not exc.__suppress_context__:
            exc, link = exc.__context__, "During handling of the above exception, another exception occurred:"
        else:
            exc = None
    parts: list[str] = []
    for err, link in reversed(chain):
        text = (describe_error(err) + " (text not shown: it can quote note text)") if is_db_error(err) \
            else one_line(scrub(str(err)))
        kind = type(err)
        name = kind.__qualname__ if kind.__module__ in ("builtins", "__main__") else f"{kind.__module__}.{kind.__qualname__}"
        parts.append("Traceback (most recent call last):\n" + "".join(traceback.format_tb(err.__traceback__))
                     + f"{name}: {text}" + (f"\n\n{link}\n" if link else ""))
    return "\n".join(parts).rstrip("\n")


def _pair(name: str, value: Any) -> str:
    # A value that is not a plain token (a vendor's note id with spaces, say) is quoted, so
    # it cannot add pairs of its own (` account_id=2`). An int's text always is one (most
    # pairs are ids: no pattern match for them).
    if type(value) is int:
        return f"{name}={value}"
    text = str(value)
    return f"{name}={text}" if _TOKEN.fullmatch(text) else f"{name}={json.dumps(text)}"


_TOKEN = re.compile(r"[\w.:/@+,-]*")
# The ` | key=value` suffix's fields, in their order (the task's name is in Celery's text).
_SUFFIX_FIELDS = tuple(n for n in CONTEXT_FIELDS + EXTRA_FIELDS if n != "task_name")


class JsonFormatter(logging.Formatter):
    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return format_exception(ei[1])

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS + EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(line, default=str)


class ContextSuffixFormatter(logging.Formatter):
    """Celery's own text format, plus ` | job_id=12 task_id=... step=claim`."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter("[%(asctime)s: %(levelname)s/%(processName)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line = record
        if one_line(message) is not message or record.exc_info:
            # A copy, so another handler of the same record formats the original.
            line = logging.makeLogRecord(record.__dict__)
            line.msg, line.args = one_line(message), None
            if record.exc_info:
                line.exc_text = format_exception(record.exc_info[1])
        text = self.inner.format(line)
        pairs = [_pair(n, v) for n in _SUFFIX_FIELDS if (v := getattr(record, n, None)) is not None]
        if not pairs:
            return text
        head, sep, tail = text.partition("\n")  # keep a traceback below the line it belongs to
        return f"{head} | {' '.join(pairs)}{sep}{tail}"


def json_enabled() -> bool:
    return os.environ.get("LOG_FORMAT", "text").strip().lower() == "json"


def install(logger: logging.Logger) -> None:
    """Give every handler of `logger` the context filter and our formatter (idempotent)."""
    for handler in logger.handlers:
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
        if json_enabled():
            if not isinstance(handler.formatter, JsonFormatter):
                handler.setFormatter(JsonFormatter())
        elif not isinstance(handler.formatter, ContextSuffixFormatter):
            handler.setFormatter(ContextSuffixFormatter(handler.formatter))


class UncancellableTaskFilter(logging.Filter):
    """On a broker connection loss Celery cancels each running acks_late task
    (worker_cancel_long_running_tasks_on_connection_loss). A pool that cannot stop a running
    task (threads, solo) makes that a 3-line "Terminating it instead" warning, which is not
    true, and a "Failed to cancel" warning with a ~100-line NotImplementedError traceback,
    per running task. This keeps one true warning line per task instead. Installed on
    Celery's consumer logger only for such pools (worker.signals, worker_init)."""

    def __init__(self, pool_name: str) -> None:
        super().__init__()
        from celery.worker.consumer.consumer import TERMINATING_TASK_ON_RESTART_AFTER_A_CONNECTION_LOSS

        self.pool_name = pool_name
        self.terminating = TERMINATING_TASK_ON_RESTART_AFTER_A_CONNECTION_LOSS

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == self.terminating:  # one per running task: say what really happens
            request = record.args[0] if isinstance(record.args, tuple) and record.args else None
            record.msg = ("broker connection lost while task %s (%s) was running: the %s pool cannot stop it, so it "
                          "runs to the end and its job row records the outcome (a redelivered message finds the job "
                          "finished)")
            record.args = (getattr(request, "id", "?"), getattr(request, "name", "?"), self.pool_name)
            return True
        exc = record.exc_info[1] if record.exc_info else None
        # The pool's "cannot terminate" that follows: the line above said it already.
        return not (isinstance(exc, NotImplementedError)
                    and str(record.msg).startswith("Failed to cancel active request"))


def quiet_uncancellable_tasks(pool_cls: Any) -> bool:
    """Install UncancellableTaskFilter if this worker's pool cannot terminate a running task."""
    from celery import concurrency
    from celery.concurrency import solo, thread

    pool = concurrency.get_implementation(pool_cls)
    # Prefork sets terminate_job on the instance once started, so the class cannot be asked:
    # name the pools that run tasks in the worker's own process and cannot stop one.
    names = {thread.TaskPool: "threads", solo.TaskPool: "solo"}
    name = next((n for cls, n in names.items() if isinstance(pool, type) and issubclass(pool, cls)), None)
    if name is None:
        return False
    target = logging.getLogger("celery.worker.consumer.consumer")
    if not any(isinstance(f, UncancellableTaskFilter) for f in target.filters):
        target.addFilter(UncancellableTaskFilter(name))
    return True
