"""Guarantees 2-4 when replies are lost or late, and when messages are duplicated: the
PSA applied a write but we never heard back; the same job is published many times; jobs of
one ticket arrive together."""
from __future__ import annotations

import pytest

from models.db import session_scope
from models import WritebackAttempt
from sqlalchemy import select
from tasks import enqueue_post_note, enqueue_resolve, enqueue_transition, publish
from tests.factories import RESOLVED, attempts, job, wait_terminal
from tests.harness import wait_for

pytestmark = pytest.mark.slow


def test_post_applied_then_connection_dropped_leaves_exactly_one_note(world, chaos):
    # given the PSA creates the note and then drops the connection without a reply
    sid = world.session(7101)
    world.sim.state.add_fault(action="drop_after_apply", operation="post_note")
    chaos.worker().start()
    # when the resolve runs
    j = wait_terminal(enqueue_resolve(None, sid, "Reset the switch port."), timeout=30)
    # then the retry finds the note and adopts it instead of posting again
    assert j.state == "succeeded", j.error_message
    assert len(world.sim.state.notes(7101)) == 1 and world.sim.state.calls["post_note"] == 1
    assert j.note_adopted is True and j.result["note"]["adopted"] is True
    first, second = attempts(j.id)
    assert (first.outcome, first.step, first.error_type) == ("retry", "note", "PsaTransientError")
    assert second.outcome == "succeeded"
    assert chaos.finished_count() == {j.id: 1}
    assert [e["job_id"] for e in chaos.events("job_retry_scheduled")] == [j.id]


def test_a_lost_post_is_found_however_many_notes_were_added_before_the_retry(world, chaos):
    # given a ticket with 70 notes; the PSA applies our POST and drops the reply
    sid = world.session(7105)
    for i in range(70):
        world.sim.state.add_note(7105, f"Earlier note {i}.")
    world.sim.state.add_fault(action="drop_after_apply", operation="post_note")
    chaos.worker().start()
    job_id = enqueue_resolve(None, sid, "Rebuilt the mail flow rule.")
    wait_for(lambda: any(n["text"] == "Rebuilt the mail flow rule." for n in world.sim.state.notes(7105)),
             timeout=15, message="the POST applied")
    # when 120 more notes land before the retry (a monitoring integration, say): ours is no
    # longer among the ticket's 50 most recent
    for i in range(120):
        world.sim.state.add_note(7105, f"Monitoring update {i}.", internal=True)
    j = wait_terminal(job_id, timeout=30)
    # then the retry still finds it and adopts it: one copy on the ticket
    assert j.state == "succeeded", j.error_message
    assert [n["text"] for n in world.sim.state.notes(7105)].count("Rebuilt the mail flow rule.") == 1
    assert world.sim.state.calls["post_note"] == 1 and j.note_adopted is True
    assert j.note_watermark_id == str(int(world.sim.state.notes(7105)[69]["id"]))  # the newest before ours


def test_post_applied_after_our_read_timeout_is_adopted_after_the_settle_time(world, chaos):
    # given the PSA sits on the POST for 3 s (our read timeout is 2 s) and then applies it
    sid = world.session(7102)
    world.sim.state.add_fault(action="delay", operation="post_note", seconds=3)
    chaos.worker().start()
    j = wait_terminal(enqueue_resolve(None, sid, "Renewed the certificate."), timeout=30)
    # then the retry waited for the late POST to land, and adopted it
    assert j.state == "succeeded", j.error_message
    assert len(world.sim.state.notes(7102)) == 1 and world.sim.state.calls["post_note"] == 1
    assert j.note_adopted is True
    first, second = attempts(j.id)
    assert first.outcome == "retry" and "timed out" in first.error_message
    assert (second.started_at - first.finished_at).total_seconds() >= 1.9  # POST_SETTLE = read timeout


def test_patch_applied_but_reply_lost_is_verified_not_repeated(world, chaos):
    sid = world.session(7103)
    world.sim.state.add_fault(action="drop_after_apply", operation="update_status")
    chaos.worker().start()
    j = wait_terminal(enqueue_transition(None, sid, RESOLVED), timeout=30)
    assert j.state == "succeeded" and j.result["outcome"] == "verified"
    assert world.sim.state.tickets[7103]["patches"] == 1  # re-read showed it applied: no second PATCH
    assert j.result["status"]["patched"] is False
    assert [(a.outcome, a.step) for a in attempts(j.id)] == [("retry", "transition"), ("succeeded", None)]


def test_duplicate_messages_for_a_running_then_finished_job_change_nothing(world, chaos):
    # given a job whose POST is slow, and a worker with room to run copies in parallel
    sid = world.session(7104)
    world.sim.state.add_fault(action="delay", operation="post_note", seconds=1)
    chaos.worker(concurrency=8).start()
    job_id = enqueue_resolve(None, sid, "Cleared the print queue.")
    wait_for(lambda: world.sim.state.calls["post_note"] == 1, timeout=20, message="the POST")
    # when the same job is published ten more times while it runs
    for _ in range(10):
        publish(job_id, "resolve")
    j = wait_terminal(job_id, timeout=30)
    # then exactly one execution ran
    assert j.state == "succeeded" and j.attempts == 1
    assert len(attempts(job_id)) == 1 and len(world.sim.state.notes(7104)) == 1
    before = (j.updated_at, world.sim.state.calls.copy())
    # and copies for the finished job are refused without a claim or a PSA call
    for _ in range(5):
        publish(job_id, "resolve")
    wait_for(lambda: sum(1 for w in chaos.workers for line in w.log_text().splitlines()
                         if "job already succeeded" in line) >= 5, timeout=30, message="five refusals")
    after = job(job_id)
    assert (after.updated_at, world.sim.state.calls) == before and after.attempts == 1
    assert chaos.finished_count() == {job_id: 1}


def test_jobs_of_one_ticket_run_in_enqueue_order_and_never_overlap(world, chaos):
    # given five writebacks for one ticket, enqueued together, some failing transiently
    sid = world.session(7105)
    world.sim.state.latency = 0.05
    world.sim.state.add_fault(action="error", status=503, operation="post_note", times=2)
    chaos.worker(concurrency=8).start()
    ids = [enqueue_post_note(None, sid, f"Step {i} done.", "discussion") for i in range(4)]
    ids.append(enqueue_transition(None, sid, RESOLVED))
    for job_id in ids:
        assert wait_terminal(job_id, timeout=60).state == "succeeded"
    # then the notes landed in enqueue order
    assert [n["text"] for n in world.sim.state.notes(7105)] == [f"Step {i} done." for i in range(4)]
    # and no execution of one job overlapped an execution of another
    with session_scope() as db:
        runs = db.execute(select(WritebackAttempt.job_id, WritebackAttempt.started_at, WritebackAttempt.finished_at)
                          .order_by(WritebackAttempt.started_at)).all()
    assert len(runs) == 7  # five jobs, two retries
    for earlier, later in zip(runs, runs[1:]):
        assert earlier.finished_at <= later.started_at, (earlier, later)
    assert [r.job_id for r in runs] == sorted(r.job_id for r in runs)  # job n+1 starts after job n ends
    assert chaos.finished_count() == {i: 1 for i in ids}
