"""The outcome of a writeback (or a draft preview) as the web tier returns it.

The spec this worker replaces answered the engineer's Confirm & post in the same HTTP
request. The write now happens in a worker, so the web tier reads the job row instead; this
module is the one place that turns a row into the spec's response: a frozen value with the
spec's fields and the HTTP status the spec would have answered, which an endpoint can return
as is (`o.http_status, o.to_dict()`). Waiting for it: tasks.outcome_wait.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from models import AiSession, DraftPreview, DraftStatus, JobKind, JobState, WritebackJob
from models.db import get_engine
from tasks import validation as v
from tasks.errors import ConflictError, NotFoundError, RequestError

# Writeback statuses (WritebackOutcome.status) and the HTTP status each answers.
PENDING = "pending"
CONFLICT = "conflict"
_DONE = {"resolve": "resolved", "escalate": "escalated", "post_note": "note_posted",
         "transition_status": "status_changed"}
_LOCAL = {"resolve": "resolved_local", "escalate": "escalated_local"}
_HTTP = {PENDING: 202, "verification_failed": 502, "cancelled": 409, CONFLICT: 409}


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).isoformat()


class _Value:
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO 8601 strings (UTC)."""
        return {k: _iso(v) if isinstance(v, dt.datetime) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class WritebackOutcome(_Value):
    """One writeback job as the web tier answers it.

    status: resolved | escalated | resolved_local | escalated_local | note_posted |
    status_changed | pending | verification_failed | failed | cancelled | conflict.
    http_status: 200 done, 202 pending, 409 conflict (a re-post) or cancelled, 502 the PSA
    refused or did not apply the change (verification_failed, failed on a PSA error), 500 a
    failure of ours (configuration, worker lost)."""
    job_id: int | None  # None only for a conflict with no job behind it (posted another way)
    session_id: int
    kind: str
    status: str
    http_status: int
    external_id: str | None = None  # the PSA's id of the note we posted (or adopted)
    note_adopted: bool = False  # a retry found the note already on the ticket
    psa_status_id: int | None = None  # verified: the status the re-read showed
    psa_status_name: str | None = None
    psa_status_verified_at: dt.datetime | None = None
    expected_status_id: int | None = None  # the status we set (verified or not)
    expected_status_name: str | None = None
    observed_status_id: int | None = None  # what the re-read showed (differs on a 502)
    observed_status_name: str | None = None
    status_transition_skipped_reason: str | None = None
    error: str | None = None  # why: failed, verification_failed, cancelled, conflict
    error_type: str | None = None
    attempts: int = 0
    finished_at: dt.datetime | None = None

    @property
    def pending(self) -> bool:
        return self.status == PENDING


# Previews: draft_previews.status is the status; the HTTP status each answers.
_PREVIEW_HTTP = {DraftStatus.SUCCEEDED.value: 200, DraftStatus.PENDING.value: 202, DraftStatus.RUNNING.value: 202,
                 DraftStatus.FAILED.value: 502, DraftStatus.SUPERSEDED.value: 409}


@dataclass(frozen=True)
class PreviewOutcome(_Value):
    """One draft preview: `markdown` once succeeded, `error` once failed or superseded.
    status: pending | running (202) | succeeded (200) | failed (502: the drafting API failed,
    no key, or the reply stayed out of format) | superseded (409: the session changed; ask
    again for its current state)."""
    preview_id: int
    session_id: int
    kind: str
    status: str
    http_status: int
    markdown: str | None = None
    error: str | None = None
    model: str | None = None
    completed_at: dt.datetime | None = None

    @property
    def pending(self) -> bool:
        return self.status in (DraftStatus.PENDING.value, DraftStatus.RUNNING.value)


_J = WritebackJob
_COLUMNS = (_J.id, _J.session_id, _J.kind, _J.state, _J.result, _J.note_external_id, _J.note_adopted,
            _J.expected_status_id, _J.expected_status_name, _J.observed_status_id, _J.observed_status_name,
            _J.verified_at, _J.transition_skipped_reason, _J.error_type, _J.error_message, _J.attempts,
            _J.finished_at)


def outcome(job_id: int) -> WritebackOutcome:
    """The job's outcome now (pending while it is queued, running or retrying).
    Raises NotFoundError for an unknown job id, RequestError for one that is not an id."""
    job_id = v.positive_int(job_id, "job_id")
    with get_engine().connect() as conn:
        row = conn.execute(select(*_COLUMNS).where(_J.id == job_id)).first()
    if row is None:
        raise NotFoundError(f"unknown writeback job {job_id}", field="job_id")
    return from_row(row)


def outcome_for_session(session_id: int, kind: str) -> WritebackOutcome:
    """The outcome of the session's latest job of this kind (resolve, escalate, ...).
    Raises NotFoundError when the session has none, RequestError for an unknown kind."""
    session_id = v.positive_int(session_id, "session_id")
    row = _latest(session_id, _kind(kind))
    if row is None:
        raise NotFoundError(f"session {session_id} has no {kind} writeback", field="session_id")
    return from_row(row)


def conflict_outcome(session_id: int, kind: str, error: ConflictError) -> WritebackOutcome:
    """The spec's 409 for a re-post: enqueue_resolve / enqueue_escalate raised `error`
    because the note was already posted (or a job for it is live). Carries the existing
    job's id and note id, so the UI can show where the first post went."""
    row = _latest(session_id, _kind(kind))
    if row is not None:
        return dataclasses.replace(from_row(row), status=CONFLICT, http_status=_HTTP[CONFLICT],
                                   error=error.message, error_type="ConflictError")
    with get_engine().connect() as conn:  # posted without a job of ours: the session says where
        session = conn.execute(select(AiSession.resolution_note_external_id,
                                      AiSession.escalation_package_external_id)
                               .where(AiSession.id == session_id)).first()
    external = None if session is None else (
        session.resolution_note_external_id if kind == "resolve" else session.escalation_package_external_id)
    return WritebackOutcome(job_id=None, session_id=session_id, kind=kind, status=CONFLICT,
                            http_status=_HTTP[CONFLICT], external_id=external, error=error.message,
                            error_type="ConflictError")


def _kind(kind: str) -> str:
    try:
        return JobKind(kind).value
    except ValueError:
        allowed = ", ".join(k.value for k in JobKind)
        raise RequestError(f"kind must be one of {allowed}, got {kind!r:.40}", field="kind") from None


def _latest(session_id: int, kind: str) -> Any:
    with get_engine().connect() as conn:
        return conn.execute(select(*_COLUMNS).where(_J.session_id == session_id, _J.kind == kind)
                            .order_by(_J.id.desc()).limit(1)).first()


def from_row(row: Any) -> WritebackOutcome:
    """Map a writeback_jobs row (the _COLUMNS) onto the spec's vocabulary."""
    state, result = JobState(row.state), row.result or {}
    common = dict(job_id=row.id, session_id=row.session_id, kind=row.kind, attempts=row.attempts,
                  external_id=row.note_external_id, note_adopted=bool(row.note_adopted),
                  expected_status_id=row.expected_status_id, expected_status_name=row.expected_status_name,
                  observed_status_id=row.observed_status_id, observed_status_name=row.observed_status_name,
                  status_transition_skipped_reason=result.get("status_transition_skipped_reason")
                  or row.transition_skipped_reason)
    if not state.terminal:
        return WritebackOutcome(status=PENDING, http_status=_HTTP[PENDING], **common)
    common["finished_at"] = row.finished_at
    if state is JobState.SUCCEEDED:
        local = result.get("outcome") == "local"
        status = _LOCAL[row.kind] if local else _DONE[row.kind]
        verified = row.verified_at is not None  # also set by `jobs reverify`
        return WritebackOutcome(status=status, http_status=200,
                                psa_status_id=row.observed_status_id if verified else None,
                                psa_status_name=row.observed_status_name if verified else None,
                                psa_status_verified_at=row.verified_at, **common)
    error = dict(error=row.error_message, error_type=row.error_type)
    if state is JobState.FAILED:
        # The PSA refused or could not be reached: a bad gateway, as the spec answered.
        # Anything else (configuration, a worker lost) is ours to fix: 500.
        upstream = row.error_type in _psa_error_names()
        return WritebackOutcome(status="failed", http_status=502 if upstream else 500, **common, **error)
    return WritebackOutcome(status=state.value, http_status=_HTTP[state.value], **common, **error)


def _psa_error_names() -> set[str]:
    """Names of every provider error type (PsaError and its subclasses, whatever each
    provider module calls them): the job row keeps the error's type name only."""
    import providers  # noqa: F401  (imports every registered provider, and so its error types)
    from providers.errors import PsaError

    names, todo = set(), [PsaError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


_P = DraftPreview
_PREVIEW_COLUMNS = (_P.id, _P.session_id, _P.kind, _P.status, _P.markdown, _P.error, _P.model, _P.completed_at)


def preview_outcome(preview_id: int) -> PreviewOutcome:
    """The preview's outcome now. Raises NotFoundError for an unknown preview id."""
    preview_id = v.positive_int(preview_id, "preview_id")
    with get_engine().connect() as conn:
        row = conn.execute(select(*_PREVIEW_COLUMNS).where(_P.id == preview_id)).first()
    if row is None:
        raise NotFoundError(f"unknown draft preview {preview_id}", field="preview_id")
    done = row.status == DraftStatus.SUCCEEDED.value
    return PreviewOutcome(preview_id=row.id, session_id=row.session_id, kind=row.kind, status=row.status,
                          http_status=_PREVIEW_HTTP[row.status], markdown=row.markdown if done else None,
                          error=None if done else row.error, model=row.model, completed_at=row.completed_at)
