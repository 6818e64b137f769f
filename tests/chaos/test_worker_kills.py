"""Guarantees 1-3 under SIGKILL: a worker dies while its POST is in flight at the PSA (the
simulator's `delay` applies the POST *after* the kill); a new execution may only reconcile
once the lease is over, finds the note the dead worker's POST left, and adopts it."""
from __future__ import annotations

import pytest

from tasks import enqueue_resolve
from tests.factories import RESOLVED, attempts, job, wait_terminal
from tests.harness import wait_for

pytestmark = pytest.mark.slow

NOTE = "Replaced the failing PSU.\n\nServer is back online."


def _post_in_flight(world, ticket: int, seconds: float = 3.0) -> None:
    world.sim.state.add_fault(action="delay", operation="post_note", seconds=seconds, ticket_id=ticket)


def _assert_exactly_one_adopted_note(world, ticket: int, job_id: int) -> None:
    notes = world.sim.state.notes(ticket)
    assert len(notes) == 1, notes
    assert notes[0]["text"] == NOTE and notes[0]["resolutionFlag"] is True
    assert world.sim.state.calls["post_note"] == 1  # the dead worker's POST, and no other
    j = job(job_id)
    assert j.state == "succeeded", j.error_message
    assert j.note_adopted is True and j.note_external_id == str(notes[0]["id"])
    assert j.result["note"] == {"external_id": str(notes[0]["id"]), "adopted": True}
    assert world.sim.state.status_of(ticket) == RESOLVED


# The whole-worker SIGKILL mid-POST case runs for every provider in
# tests/providers/contract/test_worker_kill.py.


def test_prefork_pool_child_sigkilled_mid_post_is_requeued_and_adopts_the_note(world, chaos):
    # given a prefork worker with one child, whose POST is in flight; no beat, no sweeper:
    # recovery must come from reject_on_worker_lost and the lease alone
    sid = world.session(7002)
    _post_in_flight(world, 7002)
    w = chaos.worker(pool="prefork", concurrency=1).start()
    job_id = enqueue_resolve(None, sid, NOTE)
    wait_for(lambda: world.sim.state.calls["post_note"] == 1, timeout=20, message="the POST to be in flight")
    # when only the pool child is SIGKILLed
    w.kill_child()
    # then MainProcess requeues the message, the redelivery waits out the lease, and the
    # next execution adopts the note instead of posting again
    wait_terminal(job_id, timeout=45)
    _assert_exactly_one_adopted_note(world, 7002, job_id)
    assert [a.outcome for a in attempts(job_id)] == ["abandoned", "succeeded"]
    assert w.alive()
    assert "WorkerLostError" in w.log_text()
    assert chaos.finished_count()[job_id] == 1


def test_worker_killed_between_patch_and_verify_does_not_repeat_the_patch(world, chaos):
    # given the PATCH is applied but its reply is slow, and the worker dies meanwhile
    sid = world.session(7003)
    world.sim.state.add_fault(action="slow_after_apply", operation="update_status", seconds=1.5)
    first = chaos.worker().start()
    job_id = enqueue_resolve(None, sid, NOTE)
    wait_for(lambda: world.sim.state.calls["update_status"] == 1, timeout=20, message="the PATCH")
    first.kill_group()
    chaos.worker(beat=True).start()
    j = wait_terminal(job_id, timeout=45)
    # then the next execution re-reads, sees the status already moved, and only verifies
    assert j.state == "succeeded" and j.result["status"]["patched"] is False
    assert world.sim.state.tickets[7003]["patches"] == 1
    assert len(world.sim.state.notes(7003)) == 1
    assert [a.outcome for a in attempts(job_id)] == ["abandoned", "succeeded"]
    assert chaos.finished_count()[job_id] == 1
