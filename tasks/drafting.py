"""The drafting task and its enqueue function (README "Drafting previews").

`writeback.draft_preview` takes JSON kwargs {"session_id": N, "kind": "resolution" |
"escalation"} (or the same two positionally) and runs on the `drafting` queue, which
celeryconfig routes it to, so writeback workers never pick it up. It drafts the
session's *current* state; the result lands in `draft_previews`, never in Celery results.

Retries: none at the Celery level (max_retries=0). Transient API errors are retried inside
one execution (drafting.client); a missing key, a 400/401 or a reply that stays out of
format ends the task in FAILURE with the reason, after the row says `failed`. With
acks_late a worker that dies mid-draft has its message redelivered, and the row's lease
lets the redelivery take over.
"""
from __future__ import annotations

import logging
from typing import Any

from celery import Task
from sqlalchemy.orm import Session

from drafting.service import PreviewRef, request_preview, run_preview
from models import DraftKind
from models.db import after_outer_commit, session_scope
from tasks import validation as v
from tasks.errors import RequestError
from worker.app import app

log = logging.getLogger("psa_writeback.tasks")

TASK_NAME = "writeback.draft_preview"
QUEUE = "drafting"
_PENDING = "psa_writeback_pending_drafts"


class InvalidDraftArguments(RequestError):
    """The message's arguments are wrong: nothing was drafted; the task fails at once."""


class DraftFailed(Exception):
    """The draft ended `failed`; the message is the row's error (shown in Flower)."""


def draft_kind(value: Any) -> DraftKind:
    try:
        return DraftKind(value)
    except ValueError:
        allowed = ", ".join(k.value for k in DraftKind)
        raise RequestError(f"kind must be one of {allowed}, got {value!r:.40}", field="kind") from None


def enqueue_draft_preview(session_id: Any, kind: Any, db: Session | None = None) -> PreviewRef:
    """Ask for a preview of the session's current state; return the row to poll.

    A state already drafted is a cache hit: `cached` is True, `status` is `succeeded` and
    nothing is published. Otherwise the task is published after the transaction commits
    (`db`'s, or a short one of its own). Raises RequestError / NotFoundError on bad input.
    """
    session_id, kind = v.positive_int(session_id, "session_id"), draft_kind(kind)
    if db is None:
        with session_scope() as own:
            return enqueue_draft_preview(session_id, kind, own)
    ref, needs_run = request_preview(db, session_id, kind)
    if needs_run:
        # A message for a row that is not committed yet (or never will be) would be a lie.
        after_outer_commit(db, _PENDING, (session_id, kind), _publish_all)
    return ref


def _publish_all(pending: list[tuple[int, DraftKind]]) -> None:
    for session_id, kind in pending:
        publish_draft(session_id, kind)


def publish_draft(session_id: int, kind: DraftKind) -> bool:
    """A failed publish is logged, not raised: the row stays `pending`, and asking again
    publishes it again."""
    try:
        app.send_task(TASK_NAME, kwargs={"session_id": session_id, "kind": kind.value}, queue=QUEUE)
        return True
    except Exception as err:
        log.warning("publish of draft (session %s, %s) failed (%s)", session_id, kind.value, type(err).__name__)
        return False


@app.task(name=TASK_NAME, bind=True, acks_late=True, max_retries=0, throws=(DraftFailed, InvalidDraftArguments))
def draft_preview(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Draft (or find cached) the preview of one session's current state for one kind."""
    try:
        if args:
            if len(args) > 2:
                raise RequestError(f"takes session_id and kind, got {len(args)} positional arguments")
            kwargs = {**dict(zip(("session_id", "kind"), args)), **kwargs}
        kwargs = v.only_known(kwargs, {"session_id", "kind"}, {"session_id", "kind"})
        session_id, kind = v.positive_int(kwargs["session_id"], "session_id"), draft_kind(kwargs["kind"])
        outcome = run_preview(session_id, kind, self.request.id or "local")
    except RequestError as err:
        raise InvalidDraftArguments(f"{TASK_NAME}: {err.message}", field=err.field) from None
    if outcome.status == "failed":
        raise DraftFailed(f"draft {outcome.preview_id} (session {session_id}, {kind.value}) failed: "
                          f"{outcome.message}")
    return {"preview_id": outcome.preview_id, "status": outcome.status}
