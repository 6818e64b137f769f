"""The Resolve / Escalate guarantees every PSA must keep (issue 12): one test per
behaviour, run for every registered provider. A future provider is done when it passes."""
from __future__ import annotations

from sqlalchemy import select

from models import Alert
from models.db import session_scope
from tasks import admin, enqueue_escalate, enqueue_post_note, enqueue_resolve, enqueue_transition
from tests.factories import attempts, session_row, wait_terminal
from tests.harness import wait_for


def test_resolve_posts_one_customer_visible_note_and_verifies_the_status(pworld, worker):
    kit, sim = pworld.kit, pworld.sim
    sid = pworld.session(5001)
    j = wait_terminal(enqueue_resolve(None, sid, "Replaced the **toner**.\n\nPrinting works again."))
    assert j.state == "succeeded", j.error_message
    assert j.result["outcome"] == "verified"
    [note] = kit.notes(sim, 5001)
    assert note.customer_visible is True
    assert note.text == "Replaced the **toner**.\n\nPrinting works again."
    assert sim.state.status_of(5001) == kit.resolved
    s = session_row(sid)
    assert s.status == "resolved" and s.resolution_note_external_id == note.id
    assert (s.psa_status_id, s.psa_status_name) == (kit.resolved, kit.resolved_name)
    assert s.psa_status_verified_at is not None


def test_escalate_posts_one_internal_note_and_moves_to_the_escalated_status(pworld, worker):
    kit, sim = pworld.kit, pworld.sim
    sid = pworld.session(5002)
    j = wait_terminal(enqueue_escalate(None, sid, "## Problem\nVPN drops.\n## Suggested next steps\nCheck MTU."))
    assert j.state == "succeeded", j.error_message
    [note] = kit.notes(sim, 5002)
    assert note.customer_visible is False
    assert sim.state.status_of(5002) == kit.escalated
    s = session_row(sid)
    assert s.status == "escalated" and s.escalation_package_external_id == note.id


def test_each_visibility_lands_as_customer_visible_or_internal(pworld, worker):
    kit, sim = pworld.kit, pworld.sim
    expected = {"resolution": True, "discussion": True, "internal": False}
    for n, (visibility, visible) in enumerate(expected.items()):
        j = wait_terminal(enqueue_post_note(None, pworld.session(5010 + n), f"A {visibility} note.", visibility))
        assert j.state == "succeeded", j.error_message
        [note] = kit.notes(sim, 5010 + n)
        assert (note.text, note.customer_visible) == (f"A {visibility} note.", visible)
        assert j.note_external_id == note.id
    assert sim.state.calls["update_status"] == 0


def test_a_status_change_the_psa_silently_ignores_ends_in_verification_failed(pworld, worker):
    kit, sim = pworld.kit, pworld.sim
    sid = pworld.session(5003, reject_status_changes=True)
    j = wait_terminal(enqueue_resolve(None, sid, "Done."))
    assert j.state == "verification_failed"
    assert (j.expected_status_id, j.expected_status_name) == (kit.resolved, kit.resolved_name)
    assert (j.observed_status_id, j.observed_status_name) == (kit.new, kit.new_name)
    assert f"expected status {kit.resolved} ({kit.resolved_name}), observed {kit.new} ({kit.new_name})" \
        in j.error_message
    assert sim.state.tickets[5003]["patches"] == 1  # re-read a few times, never re-PATCHed
    assert session_row(sid).resolution_note_posted_at is not None  # the note itself did land


def test_a_ticket_already_at_the_target_is_verified_without_a_write(pworld, worker):
    kit, sim = pworld.kit, pworld.sim
    sid = pworld.session(5004, status_id=kit.resolved)
    j = wait_terminal(enqueue_resolve(None, sid, "Already fixed by the customer."))
    assert j.state == "succeeded" and j.result["status"]["patched"] is False
    assert sim.state.tickets[5004]["patches"] == 0
    assert session_row(sid).psa_status_verified_at is not None


def test_transient_errors_are_retried_with_attempts_recorded(pworld, worker):
    kit, sim = pworld.kit, pworld.sim
    sid = pworld.session(5005)
    sim.state.add_fault(action="error", status=503, operation="post_note", times=2)
    sim.state.add_fault(action="drop_after_apply", operation="update_status", times=1)  # applied, reply lost
    j = wait_terminal(enqueue_resolve(None, sid, "Retry me."), timeout=40)
    assert j.state == "succeeded", j.error_message
    assert [a.outcome for a in attempts(j.id)] == ["retry", "retry", "retry", "succeeded"]
    assert attempts(j.id)[0].http_status == 503
    assert len(kit.notes(sim, 5005)) == 1
    assert sim.state.tickets[5005]["patches"] == 1  # the retry saw the status and did not write again


def test_a_permanent_refusal_fails_at_once_with_the_vendors_message(pworld, worker):
    kit, sim = pworld.kit, pworld.sim
    sid = pworld.session(5006)
    status, body = kit.refusal
    sim.state.add_fault(action="error", operation="update_status", status=status, body=body)
    j = wait_terminal(enqueue_transition(None, sid, kit.resolved))
    assert j.state == "failed" and j.attempts == 1, j.error_message
    assert kit.refusal_text in j.error_message and f"HTTP {status}" in j.error_message
    assert sim.state.status_of(5006) == kit.new


def test_a_note_applied_whose_reply_was_lost_is_adopted_not_posted_again(pworld, worker):
    kit, sim = pworld.kit, pworld.sim
    sid = pworld.session(5007)
    sim.state.add_note(5007, "A technician's earlier note.")
    sim.state.add_fault(action="drop_after_apply", operation="post_note")
    j = wait_terminal(enqueue_resolve(None, sid, "Reset the switch port."))
    assert j.state == "succeeded", j.error_message
    assert [n.text for n in kit.notes(sim, 5007)].count("Reset the switch port.") == 1
    assert sim.state.calls["post_note"] == 1 and j.note_adopted is True


def test_rejected_credentials_fail_the_jobs_and_raise_one_alert_for_the_connection(pworld, worker):
    kit, sim = pworld.kit, pworld.sim
    with session_scope() as db:
        bad = admin.add_connection(db, account_id=pworld.account_id, **kit.connection(sim, **kit.wrong_keys())).id
        sessions = []
        for ticket in (5021, 5022):
            sim.state.add_ticket(ticket)
            sessions.append(admin.create_session(db, account_id=pworld.account_id, psa_connection_id=bad,
                                                 psa_ticket_id=ticket).id)
    for n, sid in enumerate(sessions):
        j = wait_terminal(enqueue_resolve(None, sid, f"Note {n}."))
        assert (j.state, j.error_type, j.attempts) == ("failed", "PsaAuthError", 1)
        assert "revoked-fake-key" not in (j.error_message or "")
    alerts = wait_for(lambda: _alerts("auth_failed"), message="the auth alert")
    assert [(a.connection_id, a.provider) for a in alerts] == [(bad, kit.provider)]
    assert _alerts("job_failed") == []
    assert all(not n for n in (kit.notes(sim, 5021), kit.notes(sim, 5022)))


def test_a_429_holds_the_connection_for_its_retry_after_then_succeeds(pworld, worker):
    sim = pworld.sim
    sid = pworld.session(5008)
    sim.state.add_fault(action="error", status=429, retry_after=1.5, operation="get_ticket")
    j = wait_terminal(enqueue_transition(None, sid, pworld.kit.resolved))
    assert j.state == "succeeded", j.error_message
    first, second = attempts(j.id)
    assert first.http_status == 429 and first.error_type == "PsaRateLimited"
    assert (second.started_at - first.finished_at).total_seconds() >= 1.4  # backoff alone would be < 0.2


def _alerts(kind: str) -> list[Alert]:
    with session_scope() as db:
        return list(db.scalars(select(Alert).where(Alert.kind == kind).order_by(Alert.id)))
