"""Issue 2 rules: preferences, local sessions, conflicts, refusals, retry classes."""
from __future__ import annotations

import pytest
from sqlalchemy import func, select

from models import WritebackJob
from models.db import session_scope
from tasks import (ConflictError, NotFoundError, RequestError, enqueue_post_note, enqueue_resolve,
                   enqueue_transition, enqueue_escalate)
from tasks import admin
from tests.factories import RESOLVED, World, attempts, session_row, wait_terminal


def _job_count() -> int:
    with session_scope() as db:
        return db.scalar(select(func.count()).select_from(WritebackJob))


def test_unset_target_status_posts_note_and_skips_transition_with_reason(db_clean, sim, worker):
    world = World.create(sim, prefs={})
    sid = world.session(6001)
    j = wait_terminal(enqueue_resolve(None, sid, "Fixed."))
    assert j.state == "succeeded"
    assert j.result["outcome"] == "transition_skipped"
    assert "cw_resolved_status_id is not set" in j.result["status_transition_skipped_reason"]
    assert len(sim.state.notes(6001)) == 1
    assert sim.state.calls["update_status"] == 0 and sim.state.status_of(6001) == 1
    assert session_row(sid).status == "resolved"


@pytest.mark.parametrize("bad", ["9", 9.5, True, -3, {"id": 9}])
def test_non_integer_target_status_counts_as_unset_with_a_reason(db_clean, sim, worker, bad, caplog):
    world = World.create(sim, prefs={"cw_resolved_status_id": bad})
    sid = world.session(6002)
    job_id = enqueue_resolve(None, sid, "Fixed.")
    assert any("not a positive integer" in r.getMessage() for r in caplog.records)  # the warning
    j = wait_terminal(job_id)
    assert j.state == "succeeded"
    assert "not a positive integer" in j.result["status_transition_skipped_reason"]
    assert sim.state.calls["update_status"] == 0


def test_no_psa_linked_makes_no_http_call_and_stores_locally(world, worker):
    sid = world.session(linked=False)
    j = wait_terminal(enqueue_escalate(None, sid, "## Problem\nlocal only"))
    assert j.state == "succeeded" and j.result["outcome"] == "local"
    assert sum(world.sim.state.calls.values()) == 0
    s = session_row(sid)
    assert s.status == "escalated_local"
    assert s.escalation_package_markdown == "## Problem\nlocal only"
    assert s.escalation_package_external_id is None


def test_second_resolve_of_a_session_is_a_conflict_and_posts_nothing(world, worker):
    sid = world.session(6003)
    wait_terminal(enqueue_resolve(None, sid, "First."))
    with pytest.raises(ConflictError, match="already posted"):
        enqueue_resolve(None, sid, "Second.")
    assert len(world.sim.state.notes(6003)) == 1


def test_resolve_while_one_is_live_is_a_conflict(world):
    sid = world.session(6004)
    first = enqueue_resolve(None, sid, "First.")  # no worker: stays queued
    with pytest.raises(ConflictError, match=f"job {first}"):
        enqueue_resolve(None, sid, "Again.")
    assert _job_count() == 1


def test_same_idempotency_key_returns_the_same_job(world):
    sid = world.session(6005)
    a = enqueue_resolve(None, sid, "Once.", idempotency_key="web-req-1")
    b = enqueue_resolve(None, sid, "Once.", idempotency_key="web-req-1")
    assert a == b and _job_count() == 1


@pytest.mark.parametrize("markdown", ["", "   \n\t  "])
def test_empty_markdown_is_refused_before_anything_is_written(world, markdown):
    sid = world.session(6006)
    with pytest.raises(RequestError, match="empty"):
        enqueue_resolve(None, sid, markdown)
    assert _job_count() == 0 and sum(world.sim.state.calls.values()) == 0


def test_unknown_session_is_refused(world):
    with pytest.raises(NotFoundError, match="unknown session 999"):
        enqueue_resolve(None, 999, "x")


def test_unknown_inactive_and_foreign_connections_are_refused(world):
    sid = world.session(6007)
    with pytest.raises(NotFoundError, match="unknown PSA connection 777"):
        enqueue_resolve(None, sid, "x", psa_connection_id=777)
    with session_scope() as db:
        st = world.sim.state
        other = admin.add_connection(db, account_id=2, provider="connectwise", base_url=world.sim.base_url,
                                     company_id=st.company_id, client_id=st.client_id, public_key="p",
                                     private_key="q")
        other_id = other.id
    with pytest.raises(RequestError, match="belongs to another account"):
        enqueue_resolve(None, sid, "x", psa_connection_id=other_id)
    with session_scope() as db:
        from models import PsaConnection
        db.get(PsaConnection, world.connection_id).is_active = False
    with pytest.raises(RequestError, match="is inactive"):
        enqueue_resolve(None, sid, "x")
    assert _job_count() == 0 and sum(world.sim.state.calls.values()) == 0


@pytest.mark.parametrize("status,fault", [
    (400, {"status": 400, "body": {"code": "InvalidObject", "message": "ticket object is invalid",
                                   "errors": [{"message": "Summary is required", "field": "summary"}]}}),
    (401, {"status": 401}), (403, {"status": 403}), (404, {"status": 404}),
])
def test_permanent_errors_fail_at_once_with_the_vendor_message(world, worker, status, fault):
    sid = world.session(6100 + status)
    world.sim.state.add_fault(action="error", operation="post_note", **fault)
    j = wait_terminal(enqueue_resolve(None, sid, "x"))
    assert j.state == "failed" and j.attempts == 1
    assert f"HTTP {status}" in j.error_message
    if status == 400:
        assert "Summary is required" in j.error_message
    if status == 403:
        assert "security permission" in j.error_message
    assert attempts(j.id)[0].http_status == status


def test_status_not_on_the_tickets_board_fails_at_once(world, worker):
    sid = world.session(6010)
    j = wait_terminal(enqueue_transition(None, sid, 12345))
    assert j.state == "failed" and j.attempts == 1
    assert "Service Status 12345 not found for Service Board 1" in j.error_message
    assert j.error_type == "PsaInvalidStatus"


@pytest.mark.parametrize("fault", [
    {"action": "error", "status": 500}, {"action": "error", "status": 502},
    {"action": "error", "status": 409}, {"action": "drop_after_apply", "operation": "get_ticket"},
    {"action": "slow_after_apply", "operation": "get_ticket", "seconds": 3.5},  # past PSA_READ_TIMEOUT=3
])
def test_transient_errors_are_retried_then_succeed(world, worker, fault):
    sid = world.session(6020)
    world.sim.state.add_fault(**{"operation": "update_status", "times": 1, **fault})
    j = wait_terminal(enqueue_transition(None, sid, RESOLVED), timeout=40)
    assert j.state == "succeeded", j.error_message
    assert j.attempts == 2
    assert [a.outcome for a in attempts(j.id)] == ["retry", "succeeded"]


def test_retries_are_bounded_then_failed_with_the_reason(world, worker):
    sid = world.session(6040)
    world.sim.state.add_fault(action="error", status=503, operation="post_note", times=-1)
    j = wait_terminal(enqueue_post_note(None, sid, "x", "discussion", max_attempts=3), timeout=40)
    assert j.state == "failed"
    assert j.attempts == 3
    assert "gave up after 3 attempts" in j.error_message and "HTTP 503" in j.error_message
    assert [a.outcome for a in attempts(j.id)] == ["retry", "retry", "failed"]


def test_post_note_task_posts_with_the_requested_visibility_and_no_transition(world, worker):
    sid = world.session(6050)
    j = wait_terminal(enqueue_post_note(None, sid, "FYI: customer called.", "discussion"))
    assert j.state == "succeeded" and j.result["outcome"] == "note_posted"
    [note] = world.sim.state.notes(6050)
    assert note["detailDescriptionFlag"] is True and not note["internalAnalysisFlag"]
    assert world.sim.state.calls["update_status"] == 0
    assert session_row(sid).resolution_note_posted_at is None  # not a resolution


def test_transition_task_verifies_and_records_on_session(world, worker):
    sid = world.session(6060)
    j = wait_terminal(enqueue_transition(None, sid, 5))
    assert j.state == "succeeded" and j.result["outcome"] == "verified"
    assert world.sim.state.status_of(6060) == 5
    s = session_row(sid)
    assert (s.psa_status_id, s.psa_status_name) == (5, "In Progress")
    assert s.status == "open"  # a plain transition does not resolve the session
