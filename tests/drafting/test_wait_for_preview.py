"""Issue 13 for drafts: wait_for_preview returns the markdown or the failure reason as soon
as the drafting worker commits it (NOTIFY), the pending outcome at the timeout."""
from __future__ import annotations

import threading

import pytest

from drafting.service import request_preview
from models import DraftKind
from models.db import session_scope
from tasks import NotFoundError
from tasks import outcome_wait
from tasks.drafting import enqueue_draft_preview
from tasks import outcome_listener
from tasks.outcome_listener import listener
from tasks.outcome_wait import wait_for_preview
from tests.drafting.builders import GOOD_ESCALATION, add_message, make_session, wait_preview
from tests.harness import wait_for

pytestmark = pytest.mark.usefixtures("db_clean", "drafting_worker")


@pytest.fixture(scope="module", autouse=True)
def _own_listener():
    """This module's waiters share one listener; stop it when the module is done, so no
    connection of it outlives the module (later tests kill backends, the suite drops its
    database)."""
    yield
    outcome_listener.shutdown()


def _unpublished_preview(session_id: int) -> int:
    """A pending preview row no message announces: only the test changes it."""
    with session_scope() as db:
        ref, _ = request_preview(db, session_id, DraftKind.ESCALATION)
        return ref.preview_id


def test_a_drafted_preview_reaches_its_waiter_with_the_markdown(api, monkeypatch):
    monkeypatch.setattr(outcome_wait, "DEGRADED_POLL_SECONDS", 60.0)
    api.reply_text(GOOD_ESCALATION, delay=0.3)  # the waiter subscribes before the draft lands
    ref = enqueue_draft_preview(make_session(), "escalation")
    before = listener().notifications
    p = wait_for_preview(ref.preview_id, timeout=20)
    assert (p.status, p.http_status, p.preview_id) == ("succeeded", 200, ref.preview_id)
    assert p.markdown == wait_preview(ref.preview_id).markdown and "## Current hypothesis" in p.markdown
    assert p.error is None and p.kind == "escalation"
    assert listener().notifications > before


def test_a_failed_draft_reaches_its_waiter_with_the_reason(api):
    api.reply_error(400, "prompt is too long")
    ref = enqueue_draft_preview(make_session(), "escalation")
    p = wait_for_preview(ref.preview_id, timeout=20)
    assert (p.status, p.http_status, p.markdown) == ("failed", 502, None)
    assert "prompt is too long" in p.error


def test_a_superseded_preview_wakes_its_waiter_with_409(monkeypatch):
    # given a waiter on a pending preview, with no polling to hide a missing NOTIFY
    monkeypatch.setattr(outcome_wait, "DEGRADED_POLL_SECONDS", 60.0)
    sid = make_session()
    preview_id = _unpublished_preview(sid)
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("p", wait_for_preview(preview_id, timeout=30)))
    thread.start()
    wait_for(lambda: listener().waiting() >= 1 and listener().listening(), timeout=10, message="waiter subscribed")
    # when the session changes and its new state is asked for
    add_message(sid, "engineer", "One more finding.")
    _unpublished_preview(sid)
    # then the old preview's waiter learns at once that it will never be drafted
    thread.join(5)
    assert (box["p"].status, box["p"].http_status) == ("superseded", 409)
    assert "session changed" in box["p"].error


def test_a_timeout_is_the_202_pending_outcome_and_unknown_ids_are_not_found():
    preview_id = _unpublished_preview(make_session())
    p = wait_for_preview(preview_id, timeout=0.3)
    assert (p.status, p.http_status, p.markdown) == ("pending", 202, None)
    with pytest.raises(NotFoundError, match="unknown draft preview 999999"):
        wait_for_preview(999_999, timeout=1)
