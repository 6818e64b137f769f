"""Guarantee 1 when Redis goes away: a private redis-server is SIGKILLed mid-run (no
persistence, so every queued, unacked and countdown message is gone) and started again.
The rows in PostgreSQL are the promise; the worker reconnects and the sweeper re-publishes."""
from __future__ import annotations

import time

import pytest

from tasks import enqueue_escalate, enqueue_resolve, enqueue_transition
from tests.factories import ESCALATED, RESOLVED, TERMINAL, attempts, job, wait_terminal
from tests.harness import wait_for

pytestmark = pytest.mark.slow


def _enqueue(world, ticket: int) -> tuple[int, int]:
    sid = world.session(ticket)
    kind = ticket % 3
    if kind == 0:
        return enqueue_resolve(None, sid, f"Fixed ticket {ticket}."), RESOLVED
    if kind == 1:
        return enqueue_escalate(None, sid, f"## Problem\nTicket {ticket}."), ESCALATED
    return enqueue_transition(None, sid, RESOLVED), RESOLVED


def test_redis_killed_and_restarted_mid_run_every_job_still_finishes(world, chaos):
    # given a worker with beat and forty jobs under way (slow PSA, some transient errors)
    world.sim.state.latency = 0.1
    world.sim.state.add_fault(action="error", status=503, operation="get_ticket", times=6)
    w = chaos.worker(concurrency=8, beat=True).start()
    jobs = dict(_enqueue(world, t) for t in range(8000, 8040))
    wait_for(lambda: sum(job(i).state in TERMINAL for i in jobs) >= 8, timeout=40, message="a first batch")
    # when Redis dies with everything in it, and jobs are enqueued while it is down
    chaos.broker.kill()
    time.sleep(1.0)
    started = time.monotonic()
    jobs.update(_enqueue(world, t) for t in range(8040, 8045))
    assert time.monotonic() - started < 10  # a broker outage does not hang the web tier
    time.sleep(2.0)
    chaos.broker.start()
    # then every job reaches a terminal state, and a correct one
    for job_id in jobs:
        wait_terminal(job_id, timeout=90)
    for job_id, target in jobs.items():
        j = job(job_id)
        assert j.state == "succeeded", (job_id, j.state, j.error_message)
        assert world.sim.state.status_of(j.ticket_id) == target
        if j.markdown is not None:
            assert len(world.sim.state.notes(j.ticket_id)) == 1
    # by the same worker process, which reconnected
    assert w.alive() and "Unrecoverable error" not in w.log_text()
    assert w.log_text().count("Connected to redis://") >= 2
    assert chaos.finished_count() == {i: 1 for i in jobs}


def test_retry_publish_fails_while_redis_is_down_and_the_sweeper_brings_it_back(world, chaos):
    # given a job whose PSA call fails slowly (503 after 2 s), so its retry is published late
    sid = world.session(8101)
    world.sim.state.add_fault(action="error", status=503, operation="get_ticket", seconds=2)
    w = chaos.worker(beat=True).start()
    job_id = enqueue_transition(None, sid, RESOLVED)
    wait_for(lambda: world.sim.state.calls["get_ticket"] == 1, timeout=20, message="the slow call")
    # when Redis dies while the call is in flight
    chaos.broker.kill()
    # then the failure is recorded as a retry in the database even though Celery could
    # not publish the retry message (it rejects the task instead)
    wait_for(lambda: [a.outcome for a in attempts(job_id)] == ["retry"], timeout=20, message="the retry row")
    assert job(job_id).state == "retrying"
    wait_for(lambda: "Reject" in w.log_text() or "rejected" in w.log_text(), timeout=20,
             message="the worker to report the failed retry publish")
    time.sleep(1.0)
    chaos.broker.start()
    # and once Redis is back the sweeper re-publishes the due job and it completes
    j = wait_terminal(job_id, timeout=60)
    assert j.state == "succeeded", j.error_message
    assert [a.outcome for a in attempts(job_id)] == ["retry", "succeeded"]
    assert world.sim.state.status_of(8101) == RESOLVED
    assert chaos.finished_count() == {job_id: 1}
    # by the same worker: losing Redis with a task in flight used to stop it for good
    # ("Unrecoverable error: AttributeError ... 'hostname'", see tasks.writeback)
    assert w.alive() and "Unrecoverable error" not in w.log_text()
    assert w.log_text().count("Connected to redis://") >= 2


def test_broker_lost_under_threads_logs_one_warning_line_per_running_task(world, chaos):
    # given a threads worker with three jobs in flight, each waiting 4 s on the PSA
    world.sim.state.add_fault(action="delay", operation="get_ticket", seconds=4, times=3)
    w = chaos.worker(concurrency=4, env={"PSA_READ_TIMEOUT": "8", "JOB_LEASE_SECONDS": "30"}).start()
    mark = w.mark()
    jobs = [enqueue_transition(None, world.session(t), RESOLVED) for t in (8201, 8202, 8203)]
    wait_for(lambda: world.sim.state.calls["get_ticket"] >= 3, timeout=20, message="three reads in flight")
    # when Redis dies under them (and comes back)
    chaos.broker.kill()
    lost = "broker connection lost while task"
    wait_for(lambda: w.log_text(mark).count(lost) >= 3, timeout=20, message="the worker to notice")
    chaos.broker.start()
    # then the jobs run to the end (a thread cannot be stopped) ...
    for job_id in jobs:
        assert wait_terminal(job_id, timeout=60).state == "succeeded"
    wait_for(lambda: w.log_text(mark).count("Connected to redis://") >= 1, timeout=30, message="the reconnect")
    # ... and the log says so in one warning line per running task: no traceback, no
    # "Terminating it instead" (it is not terminated)
    log = w.log_text(mark)
    lines = [ln for ln in log.splitlines() if lost in ln]
    assert len(lines) == 3, lines
    for line in lines:
        assert "WARNING" in line and "writeback.transition_status" in line and "the threads pool cannot stop it" in line
    assert "does not implement kill_job" not in log
    assert "Traceback" not in log and "Terminating it instead" not in log
    assert len({ln.split(lost)[1].split()[0] for ln in lines}) == 3  # one per task, each its own id
