"""Guarantee 1 when PostgreSQL misbehaves: backends killed mid-transaction
(pg_terminate_backend), and the database unreachable for a while, at claim time and in the
middle of an execution (a TCP proxy between the worker and PostgreSQL is cut)."""
from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from tasks import enqueue_escalate, enqueue_resolve
from tests import conftest, harness
from tests.factories import ESCALATED, RESOLVED, TERMINAL, attempts, job
from tests.harness import wait_for

pytestmark = pytest.mark.slow


def _safe(fn, *args):
    """This process's pooled connections are killed too: read until a read gets through."""
    for _ in range(50):
        try:
            return fn(*args)
        except OperationalError:
            time.sleep(0.1)
    raise AssertionError("database unreadable")


def _wait_terminal(job_id: int, timeout: float) -> None:
    wait_for(lambda: _safe(job, job_id).state in TERMINAL, timeout=timeout, message=f"job {job_id} terminal")


def test_backends_killed_repeatedly_mid_run_jobs_resume_and_finish(world, chaos):
    # given thirty jobs under way on a slowish PSA
    # (enqueued before the worker starts, so the kills meet them under way even when a
    # loaded machine makes enqueueing as slow as the jobs themselves)
    world.sim.state.latency = 0.2
    jobs = {}
    for t in range(9000, 9030):
        sid = world.session(t)
        jobs[enqueue_resolve(None, sid, f"Fixed {t}.") if t % 2 else enqueue_escalate(None, sid, f"Handoff {t}.")] = t
    chaos.worker(concurrency=8).start()
    # when every connection to the database is killed every 150 ms for six seconds (or more)
    killed, stop = [], threading.Event()

    def killer() -> None:
        while not stop.is_set():
            killed.append(harness.kill_db_backends(conftest.DATABASE_URL))
            time.sleep(0.15)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    unfinished_at_start = sum(_safe(job, i).state not in TERMINAL for i in jobs)
    # Six seconds at least; on a loaded machine fewer backends exist per round, so go on
    # (up to 20 s) until the kills have really hit the running system.
    started = time.monotonic()
    while time.monotonic() - started < 6 or (sum(killed) <= 20 and time.monotonic() - started < 20):
        time.sleep(0.2)
    stop.set()
    thread.join()
    # then every job still finishes, correctly, with one note
    for job_id in jobs:
        _wait_terminal(job_id, timeout=60)
    assert sum(killed) > 20 and unfinished_at_start > 20  # the kills really hit a running system
    for job_id, ticket in jobs.items():
        j = job(job_id)
        assert j.state == "succeeded", (job_id, j.error_message)
        assert len(world.sim.state.notes(ticket)) == 1, ticket
        assert world.sim.state.status_of(ticket) == (RESOLVED if ticket % 2 else ESCALATED)
        history = attempts(job_id)
        assert [a.attempt_no for a in history] == list(range(1, j.attempts + 1))
        assert history[-1].outcome == "succeeded"
    assert chaos.finished_count() == {i: 1 for i in jobs}


def _db_proxy() -> harness.TcpProxy:
    """A proxy to the server the test database really is on (TEST_DATABASE_ADMIN_URL's)."""
    url = make_url(conftest.DATABASE_URL)
    return harness.TcpProxy(url.port or 5432, url.host or "127.0.0.1")


def _proxied_env(proxy: harness.TcpProxy) -> dict[str, str]:
    """The test database's URL (driver, user, password, name, query) reached through the proxy."""
    url = make_url(conftest.DATABASE_URL).set(host="127.0.0.1", port=proxy.port)
    return {"DATABASE_URL": url.render_as_string(hide_password=False)}


def test_database_unreachable_at_claim_time_the_message_waits_and_the_job_runs_later(world, chaos):
    # given a worker whose only way to PostgreSQL is a proxy, and the proxy is cut
    proxy = _db_proxy().up()
    try:
        w = chaos.worker(env=_proxied_env(proxy)).start()
        proxy.down()
        sid = world.session(9101)
        # when a job is enqueued (the web tier's own database is fine)
        job_id = enqueue_resolve(None, sid, "Swapped the NIC.")
        # then the worker cannot claim it, says so, and keeps the message coming back
        wait_for(lambda: "database unavailable" in w.log_text(), timeout=30, message="the outage to be noticed")
        time.sleep(2)
        j = job(job_id)
        assert (j.state, j.attempts) == ("queued", 0) and attempts(job_id) == []
        assert world.sim.state.calls["post_note"] == 0
        # and once the database is reachable again the job runs, once
        proxy.up()
        _wait_terminal(job_id, timeout=45)
        j = job(job_id)
        assert j.state == "succeeded" and j.attempts == 1
        assert len(world.sim.state.notes(9101)) == 1 and world.sim.state.status_of(9101) == RESOLVED
        assert "Unrecoverable error" not in w.log_text() and w.alive()
        assert chaos.finished_count() == {job_id: 1}
    finally:
        proxy.down()


def test_database_lost_between_post_and_its_record_the_note_is_adopted_not_reposted(world, chaos):
    # given a POST in flight, and the worker's database connection cut while it is
    proxy = _db_proxy().up()
    try:
        sid = world.session(9102)
        world.sim.state.add_fault(action="delay", operation="post_note", seconds=1)
        w = chaos.worker(env=_proxied_env(proxy)).start()
        job_id = enqueue_resolve(None, sid, "Re-seated the RAM.")
        wait_for(lambda: world.sim.state.calls["post_note"] == 1, timeout=20, message="the POST")
        proxy.down()
        # when the POST succeeds but its note id cannot be recorded (the database is gone
        # for longer than the store's own retries last)
        wait_for(lambda: "database unavailable" in w.log_text(), timeout=30, message="the outage to be noticed")
        assert len(world.sim.state.notes(9102)) == 1
        assert job(job_id).note_state == "intent"  # the id never made it to the row
        proxy.up()
        # then the next execution (after the lease) finds the note instead of posting again
        _wait_terminal(job_id, timeout=45)
        j = job(job_id)
        assert j.state == "succeeded", j.error_message
        assert j.note_adopted is True and world.sim.state.calls["post_note"] == 1
        assert len(world.sim.state.notes(9102)) == 1
        assert [a.outcome for a in attempts(job_id)] == ["abandoned", "succeeded"]
        assert chaos.finished_count() == {job_id: 1}
    finally:
        proxy.down()
