"""Issue 2 behaviours end to end: real worker process, Redis, PostgreSQL, simulator over HTTP."""
from __future__ import annotations

from celery import Celery

from models.db import session_scope
from tasks import enqueue_escalate, enqueue_resolve
from tests.factories import ESCALATED, RESOLVED, attempts, job, session_row, wait_terminal


def test_resolve_posts_customer_visible_resolution_note_and_verifies_status(world, worker):
    # given a linked session on a ticket in status New
    sid = world.session(5001)
    # when the web tier enqueues a resolve
    job_id = enqueue_resolve(None, sid, "Replaced the **toner**.\n\nPrinting works again.")
    # then the worker posts one resolution note, moves the status, and verifies it
    j = wait_terminal(job_id)
    assert j.state == "succeeded", j.error_message
    assert j.result["outcome"] == "verified"
    notes = world.sim.state.notes(5001)
    assert len(notes) == 1
    assert notes[0]["resolutionFlag"] is True and notes[0]["internalAnalysisFlag"] is False
    assert notes[0]["text"] == "Replaced the **toner**.\n\nPrinting works again."
    assert world.sim.state.status_of(5001) == RESOLVED
    s = session_row(sid)
    assert s.status == "resolved"
    assert s.resolution_note_markdown.startswith("Replaced the")
    assert s.resolution_note_external_id == str(notes[0]["id"])
    assert s.resolution_note_posted_at is not None
    assert (s.psa_status_id, s.psa_status_name) == (RESOLVED, "Resolved")
    assert s.psa_status_verified_at is not None


def test_escalate_posts_internal_only_note_and_moves_to_escalated(world, worker):
    sid = world.session(5002)
    job_id = enqueue_escalate(None, sid, "## Problem\nVPN drops.\n## Suggested next steps\nCheck MTU.")
    j = wait_terminal(job_id)
    assert j.state == "succeeded", j.error_message
    [note] = world.sim.state.notes(5002)
    assert note["internalAnalysisFlag"] is True
    assert note["resolutionFlag"] is False and note["detailDescriptionFlag"] is False
    assert note["processNotifications"] is False  # an internal note never emails anyone
    assert world.sim.state.status_of(5002) == ESCALATED
    s = session_row(sid)
    assert s.status == "escalated"
    assert s.escalation_package_external_id == str(note["id"])
    assert s.escalation_package_posted_at is not None


def test_silent_status_rejection_ends_in_verification_failed_with_expected_and_observed(world, worker):
    sid = world.session(5003, reject_status_changes=True)
    j = wait_terminal(enqueue_resolve(None, sid, "Done."))
    assert j.state == "verification_failed"
    assert (j.expected_status_id, j.expected_status_name) == (RESOLVED, "Resolved")
    assert (j.observed_status_id, j.observed_status_name) == (1, "New")
    assert j.result["status"]["verified_at"] is None
    assert "expected status 9 (Resolved), observed 1 (New)" in j.error_message
    # one PATCH only: a few re-reads are fine, re-PATCHing in a loop is not
    assert world.sim.state.tickets[5003]["patches"] == 1
    s = session_row(sid)
    assert s.status == "open" and s.psa_status_verified_at is None
    assert s.resolution_note_posted_at is not None  # the note itself did land


def test_ticket_already_at_target_skips_patch_but_verifies(world, worker):
    sid = world.session(5004, status_id=RESOLVED)
    j = wait_terminal(enqueue_resolve(None, sid, "Already fixed by the customer."))
    assert j.state == "succeeded"
    assert j.result["status"]["patched"] is False
    assert world.sim.state.tickets[5004]["patches"] == 0
    assert world.sim.state.calls["get_ticket"] >= 2  # the pre-read and the verifying re-read
    assert session_row(sid).psa_status_verified_at is not None


def test_transient_503_is_retried_and_attempts_are_recorded(world, worker):
    sid = world.session(5005)
    world.sim.state.add_fault(action="error", status=503, operation="post_note", times=2)
    job_id = enqueue_resolve(None, sid, "Retry me.")
    j = wait_terminal(job_id)
    assert j.state == "succeeded"
    assert j.attempts == 3
    history = attempts(job_id)
    assert [a.outcome for a in history] == ["retry", "retry", "succeeded"]
    assert history[0].http_status == 503 and history[0].error_type == "PsaTransientError"
    assert all(a.celery_task_id for a in history)
    assert len(world.sim.state.notes(5005)) == 1


def test_send_task_by_name_with_intent_reaches_terminal_state(world, worker):
    # The web tier does not import our code: it sends the documented name and JSON kwargs.
    sid = world.session(5006)
    client = Celery(broker=worker.env["CELERY_BROKER_URL"])
    client.conf.broker_transport_options = {"global_keyprefix": worker.env["CELERY_REDIS_KEY_PREFIX"]}
    client.send_task("writeback.resolve", kwargs={"session_id": sid, "markdown": "Sent by name."},
                     queue="writeback")
    from tests.harness import wait_for

    s = wait_for(lambda: (row := session_row(sid)).status == "resolved" and row, timeout=30, message="resolved")
    assert s.resolution_note_external_id is not None and s.psa_status_id == RESOLVED
    assert len(world.sim.state.notes(5006)) == 1


def test_jobs_enqueued_together_are_published_only_after_the_outer_commit(world, worker, monkeypatch):
    # Each enqueue uses a SAVEPOINT; releasing one must not publish the jobs before it.
    import importlib

    enq = importlib.import_module("tasks.enqueue")  # the package re-exports a function of that name
    from models import WritebackJob

    seen: list[tuple[int, bool]] = []
    real_publish = enq.publish

    def spy(job_id, kind, countdown=None, **options):
        with session_scope() as other:  # another connection: sees only committed rows
            seen.append((job_id, other.get(WritebackJob, job_id) is not None))
        return real_publish(job_id, kind, countdown, **options)

    monkeypatch.setattr(enq, "publish", spy)
    sids = [world.session(5100 + i) for i in range(3)]
    with session_scope() as db:
        ids = [enqueue_resolve(db, sid, f"Batch {sid}.") for sid in sids]
        assert seen == []  # nothing published inside the transaction
    assert sorted(seen) == [(i, True) for i in sorted(ids)]
    assert all(wait_terminal(i).state == "succeeded" for i in ids)
    # and a SAVEPOINT rolled back after some enqueues forgets only the job inside it
    seen.clear()
    later = [world.session(5110 + i) for i in range(3)]
    with session_scope() as db:
        first = enqueue_resolve(db, later[0], "Before the savepoint.")
        try:
            with db.begin_nested():
                enqueue_resolve(db, later[1], "Rolled back.")
                raise RuntimeError("the caller's step failed")
        except RuntimeError:
            pass
        last = enqueue_resolve(db, later[2], "After the savepoint.")
    assert sorted(seen) == [(first, True), (last, True)]
    assert wait_terminal(first).state == wait_terminal(last).state == "succeeded"
