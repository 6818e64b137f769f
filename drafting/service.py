"""The preview cache and one drafting execution, as plain functions the task wraps.

A `draft_previews` row is keyed by (session, kind, state hash). Asking for a state that
already has a succeeded row is a cache hit: no API call. A row is claimed (status
`running`, a lease, our task id) in one short transaction, the API is called with no
transaction open, and the result is written in another, only if we still own the row
(a redelivered message may have taken over after our lease ran out).
"""
from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import asdict, dataclass

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from drafting import drafter, prompting
from drafting.client import Usage
from drafting.config import DraftConfig, DraftConfigError
from drafting.errors import DraftError
from drafting.state import SessionState, load_state, state_hash
from models import DraftKind, DraftPreview, DraftStatus, utcnow
from models.db import session_scope
from models.notify import PREVIEW_CHANNEL, notify

log = logging.getLogger("psa_writeback.drafting")


@dataclass(frozen=True)
class PreviewRef:
    """What the enqueue API returns: which row to poll, and whether it is already done."""
    preview_id: int
    session_id: int
    kind: str
    state_hash: str
    status: str
    cached: bool

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Outcome:
    status: str  # cached | succeeded | failed | in_progress | lease_lost | gone
    preview_id: int
    message: str | None = None


def current_hash(db: Session, session_id: int) -> tuple[SessionState, str]:
    state = load_state(db, session_id)
    return state, state_hash(state, prompting.digest())


def request_preview(db: Session, session_id: int, kind: DraftKind) -> tuple[PreviewRef, bool]:
    """Make sure a row exists for the session's current state; say whether a task must run.
    Raises NotFoundError / RequestError (unknown session, empty transcript)."""
    _state, digest = current_hash(db, session_id)
    _supersede_others(db, session_id, kind, digest)
    row = _get_or_create(db, session_id, kind, digest)
    if row.status in (DraftStatus.FAILED.value, DraftStatus.SUPERSEDED.value):
        row.status, row.error = DraftStatus.PENDING.value, None  # asking again re-drafts
    stale = row.status == DraftStatus.RUNNING.value and _lease_expired(row)
    # A pending row is published again on purpose: its first message may have been lost,
    # and a duplicate is harmless because only one execution can claim the row.
    needs_run = row.status == DraftStatus.PENDING.value or stale
    cached = row.status == DraftStatus.SUCCEEDED.value
    db.flush()
    return PreviewRef(row.id, session_id, kind.value, digest, row.status, cached), needs_run


def run_preview(session_id: int, kind: DraftKind, task_id: str) -> Outcome:
    started = time.monotonic()
    with session_scope() as db:
        state, digest = current_hash(db, session_id)
        _supersede_others(db, session_id, kind, digest)
        row = _get_or_create(db, session_id, kind, digest)
        preview_id, context = row.id, f"{row.id} session={session_id} kind={kind.value}"
        if row.status == DraftStatus.SUCCEEDED.value:
            log.info("draft %s: cache hit (state %s)", context, digest[:12])
            return Outcome("cached", preview_id)
        if row.status == DraftStatus.RUNNING.value and not _lease_expired(row):
            log.info("draft %s: already being drafted by task %s", context, row.task_id)
            return Outcome("in_progress", preview_id)
        try:
            cfg = DraftConfig.from_env()
            cfg.require_api_key()
        except DraftConfigError as err:
            _finish(row, DraftStatus.FAILED, error=str(err))
            log.error("draft %s: failed: %s", context, err)
            return Outcome("failed", preview_id, str(err))
        row.status, row.task_id, row.error = DraftStatus.RUNNING.value, task_id, None
        row.lease_until = utcnow() + dt.timedelta(seconds=cfg.lease_seconds)
        row.prompt_version = prompting.recorded_version()
    usage = Usage()
    try:
        result = drafter.draft(cfg, kind, state, usage, context=context)
    except DraftError as err:
        return _store(preview_id, task_id, cfg, usage, started, context, error=err.message)
    except Exception as err:
        _store(preview_id, task_id, cfg, usage, started, context,
               error=f"unexpected error while drafting ({type(err).__name__}); see the worker log")
        raise
    return _store(preview_id, task_id, cfg, usage, started, context, markdown=result.markdown)


def _store(preview_id: int, task_id: str, cfg: DraftConfig, usage: Usage, started: float, context: str, *,
           markdown: str | None = None, error: str | None = None) -> Outcome:
    duration_ms = int((time.monotonic() - started) * 1000)
    with session_scope() as db:
        row = db.scalar(select(DraftPreview).where(DraftPreview.id == preview_id).with_for_update())
        if row is None:  # the session was deleted meanwhile (rows cascade)
            return Outcome("gone", preview_id)
        if row.status != DraftStatus.RUNNING.value or row.task_id != task_id:
            log.warning("draft %s: lease lost to task %s; result discarded", context, row.task_id)
            return Outcome("lease_lost", preview_id)
        row.model = usage.model or cfg.model
        row.input_tokens, row.output_tokens = usage.input_tokens, usage.output_tokens
        row.api_calls, row.duration_ms = usage.api_calls, duration_ms
        _finish(row, DraftStatus.SUCCEEDED if error is None else DraftStatus.FAILED, markdown=markdown, error=error)
    log.log(logging.INFO if error is None else logging.ERROR,
            "draft %s: %s model=%s calls=%d input_tokens=%d output_tokens=%d duration_ms=%d%s", context,
            "succeeded" if error is None else "failed", row.model, usage.api_calls, usage.input_tokens,
            usage.output_tokens, duration_ms, f" error={error}" if error else "")
    if error is not None:
        return Outcome("failed", preview_id, error)
    return Outcome("succeeded", preview_id)


def _finish(row: DraftPreview, status: DraftStatus, *, markdown: str | None = None, error: str | None = None) -> None:
    row.status, row.markdown, row.error = status.value, markdown, error
    row.lease_until, row.completed_at = None, utcnow()
    session = Session.object_session(row)
    if session is not None:  # wakes the web tier's wait_for_preview when this commits
        notify(session, PREVIEW_CHANNEL, row.id)


def _get_or_create(db: Session, session_id: int, kind: DraftKind, digest: str) -> DraftPreview:
    query = (select(DraftPreview).where(DraftPreview.session_id == session_id, DraftPreview.kind == kind.value,
                                        DraftPreview.state_hash == digest).with_for_update())
    row = db.scalar(query)
    if row is not None:
        return row
    try:
        with db.begin_nested():  # a concurrent ask for the same state rolls back this insert only
            row = DraftPreview(session_id=session_id, kind=kind.value, state_hash=digest,
                               status=DraftStatus.PENDING.value, prompt_version=prompting.recorded_version())
            db.add(row)
    except IntegrityError:
        row = db.scalar(query)
        assert row is not None
    return row


def _supersede_others(db: Session, session_id: int, kind: DraftKind, digest: str) -> None:
    # A pending preview of an older state will never be drafted (the task drafts the
    # current state): say so, so whoever polls it stops waiting.
    superseded = db.scalars(update(DraftPreview).where(
        DraftPreview.session_id == session_id, DraftPreview.kind == kind.value,
        DraftPreview.status == DraftStatus.PENDING.value, DraftPreview.state_hash != digest,
    ).values(status=DraftStatus.SUPERSEDED.value, error="the session changed before this state was drafted",
             completed_at=utcnow()).returning(DraftPreview.id)).all()
    for preview_id in superseded:  # their waiters (wait_for_preview) get `superseded` at once
        notify(db, PREVIEW_CHANNEL, preview_id)


def _lease_expired(row: DraftPreview) -> bool:
    return row.lease_until is None or row.lease_until <= utcnow()
