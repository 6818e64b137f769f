"""Exactly once under SIGKILL, for every provider: the worker dies while its note POST is
in flight at the PSA (the simulator applies it after the kill); the next execution finds
that note and adopts it."""
from __future__ import annotations

import pytest

from tasks import enqueue_resolve
from tests.factories import attempts, job, wait_terminal
from tests.harness import wait_for

pytestmark = pytest.mark.slow

NOTE = "Replaced the failing PSU.\n\nServer is back online."


def test_worker_killed_mid_post_completes_after_restart_with_one_note(pworld, chaos):
    kit, sim = pworld.kit, pworld.sim
    sid = pworld.session(7001)
    sim.state.add_fault(action="delay", operation="post_note", seconds=3.0, ticket_id=7001)
    first = chaos.worker().start()
    job_id = enqueue_resolve(None, sid, NOTE)
    wait_for(lambda: sim.state.calls["post_note"] == 1, timeout=20, message="the POST to be in flight")
    first.kill_group()  # the whole process group: no warm shutdown, the message stays unacked
    stuck = job(job_id)
    assert (stuck.state, stuck.note_state) == ("running", "intent")
    assert kit.notes(sim, 7001) == []  # not landed yet
    # a worker starts again (with beat: the sweeper finds the lease-expired job)
    chaos.worker(beat=True).start()
    j = wait_terminal(job_id, timeout=45)
    assert j.state == "succeeded", j.error_message
    [note] = kit.notes(sim, 7001)
    assert (note.text, note.customer_visible) == (NOTE, True)
    assert sim.state.calls["post_note"] == 1
    assert job(job_id).note_adopted is True and j.note_external_id == note.id
    assert [a.outcome for a in attempts(job_id)] == ["abandoned", "succeeded"]
    assert sim.state.status_of(7001) == kit.resolved
    assert chaos.finished_count()[job_id] == 1
