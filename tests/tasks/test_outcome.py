"""Issue 13: the web tier gets the outcome. Real PostgreSQL, Redis, worker process and the
ConnectWise simulator over HTTP; waiters LISTEN on this process's one listener connection."""
from __future__ import annotations

import asyncio
import datetime as dt
import statistics
import threading
import time

import psycopg2
import pytest
from sqlalchemy import text

from models.db import get_engine, session_scope
from tasks import ConflictError, NotFoundError, RequestError, admin, enqueue_escalate, enqueue_resolve, repair
from tasks import outcome_wait
from tasks.enqueue import build_job, publish
from models import JobKind
from tasks.outcome import conflict_outcome, outcome, outcome_for_session
from tasks import outcome_listener
from tasks.outcome_listener import APPLICATION_NAME, listener
from tasks.outcome_wait import async_wait_for_outcome, wait_for_outcome
from tests import harness
from tests.factories import ESCALATED, RESOLVED, job, wait_terminal


@pytest.fixture(scope="module", autouse=True)
def _own_listener():
    """This module's waiters share one listener; stop it when the module is done, so no
    connection of it outlives the module (later tests kill backends, the suite drops its
    database)."""
    yield
    outcome_listener.shutdown()


def _hold(world, ticket: int, seconds: float) -> None:
    """The job's first PSA call (listing notes) waits `seconds`: its waiter is surely
    subscribed before the worker commits the outcome."""
    world.sim.state.add_fault(action="delay", operation="list_notes", ticket_id=ticket, seconds=seconds)


def _unpublished_job(session_id: int) -> int:
    """A queued resolve no message announces (this worker runs no sweeper): it stays queued
    until the test changes it or publishes it."""
    with session_scope() as db:
        return build_job(db, JobKind.RESOLVE, session_id=session_id, markdown="Held back.").id


def _admin_sql(sql: str, *params) -> list[tuple]:
    conn = psycopg2.connect(harness.ADMIN_URL)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def _db_name() -> str:
    return get_engine().url.database


def _in_thread(fn, *args, **kwargs):
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as err:  # surfaced by the test
            box["error"] = err
        box["at"] = dt.datetime.now(dt.timezone.utc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def test_verified_resolve_reaches_the_waiter_within_50_ms_of_the_workers_commit(world, worker):
    # given ten resolves whose waiters are subscribed before the worker finishes them
    latencies = []
    for i in range(10):
        ticket = 13_100 + i
        sid = world.session(ticket)
        _hold(world, ticket, 0.3)
        before = listener().notifications
        job_id = enqueue_resolve(None, sid, "Replaced the toner.")
        # when the web tier waits for the outcome
        o = wait_for_outcome(job_id, timeout=20)
        woke = dt.datetime.now(dt.timezone.utc)
        # then it is the spec's verified resolve, with the note id and the verified status
        assert (o.status, o.http_status, o.job_id, o.kind) == ("resolved", 200, job_id, "resolve"), o
        [note] = world.sim.state.notes(ticket)
        assert o.external_id == str(note["id"]) and o.note_adopted is False
        assert (o.psa_status_id, o.psa_status_name) == (RESOLVED, "Resolved")
        assert o.psa_status_verified_at is not None and o.error is None
        assert o.status_transition_skipped_reason is None
        # woken by the NOTIFY of the outcome's own transaction, not by a poll
        assert listener().notifications > before
        # latency: the waiter's wake (its outcome read) minus the worker's finished_at, which
        # is taken just before the outcome statement is sent: an upper bound of commit → waiter
        latencies.append((woke - job(job_id).finished_at).total_seconds() * 1000)
    p50, worst = statistics.median(latencies), max(latencies)
    print(f"\ncommit-to-waiter latency over 10 jobs: p50 {p50:.1f} ms, max {worst:.1f} ms")
    assert p50 < 50, latencies
    assert worst < 500, latencies  # generous: 2 cores shared with other test runs


def test_200_concurrent_waiters_in_one_process_use_one_listening_connection(world, worker):
    # given 20 committed resolves the worker has not been told about yet, 10 waiters on each
    jobs = [_unpublished_job(world.session(13_200 + i)) for i in range(20)]
    lst = listener()
    waiters = [_in_thread(wait_for_outcome, job_id, timeout=90) for job_id in jobs for _ in range(10)]
    # when all 200 are waiting
    harness.wait_for(lambda: lst.waiting() == 200, timeout=60, message="200 waiters subscribed")
    # then the whole database sees exactly one LISTEN connection: this process's listener
    listeners = _admin_sql("SELECT pid, application_name FROM pg_stat_activity WHERE datname = %s "
                           "AND query LIKE 'LISTEN%%'", _db_name())
    assert listeners == [(lst.backend_pid, APPLICATION_NAME)]
    # and once the jobs run, every waiter gets its job's verified outcome
    for job_id in jobs:
        publish(job_id, "resolve")
    for thread, _ in waiters:
        thread.join(90)
    results = [box.get("value") or box.get("error") for _, box in waiters]
    assert [(r.status, r.http_status) for r in results] == [("resolved", 200)] * 200, results[:3]
    assert sorted({r.job_id for r in results}) == sorted(jobs)
    assert lst.waiting() == 0  # every waiter unsubscribed


def test_verification_failure_is_the_502_outcome_with_expected_and_observed_status(world, worker):
    sid = world.session(13_300, reject_status_changes=True)
    o = wait_for_outcome(enqueue_resolve(None, sid, "Done."), timeout=20)
    assert (o.status, o.http_status) == ("verification_failed", 502)
    assert (o.expected_status_id, o.expected_status_name) == (RESOLVED, "Resolved")
    assert (o.observed_status_id, o.observed_status_name) == (1, "New")
    assert o.psa_status_id is None and o.psa_status_verified_at is None
    assert "expected status 9 (Resolved), observed 1 (New)" in o.error
    assert o.external_id is not None  # the note itself landed
    assert o.to_dict()["observed_status_id"] == 1


def test_a_psa_that_refuses_the_note_is_a_502_failure_with_the_vendor_reason(world, worker):
    sid = world.session(13_310)
    world.sim.state.add_fault(action="error", status=400, operation="post_note", ticket_id=13_310)
    o = wait_for_outcome(enqueue_resolve(None, sid, "Done."), timeout=20)
    assert (o.status, o.http_status) == ("failed", 502)
    assert o.error_type == "PsaBadRequest" and o.error


def test_a_failure_of_ours_is_a_500_not_a_502(world, worker):
    # given a job whose PSA connection is deactivated after it was enqueued
    job_id = _unpublished_job(world.session(13_320))
    with get_engine().begin() as conn:
        conn.execute(text("UPDATE psa_connections SET is_active = false WHERE id = :id"), {"id": world.connection_id})
    publish(job_id, "resolve")
    o = wait_for_outcome(job_id, timeout=20)
    assert (o.status, o.http_status, o.error_type) == ("failed", 500, "ConfigurationError")
    assert "deactivated" in o.error


def test_a_second_resolve_of_a_posted_session_is_the_409_outcome_pointing_at_the_first(world, worker):
    # given a session whose resolution note was posted and verified
    sid = world.session(13_400)
    first = wait_for_outcome(enqueue_resolve(None, sid, "First."), timeout=20)
    assert first.status == "resolved"
    # when the engineer posts again, the enqueue API refuses it as a conflict
    with pytest.raises(ConflictError) as err:
        enqueue_resolve(None, sid, "Second.")
    # then the outcome is the spec's 409, naming the first job and its note
    o = conflict_outcome(sid, "resolve", err.value)
    assert (o.status, o.http_status) == ("conflict", 409)
    assert (o.job_id, o.external_id) == (first.job_id, first.external_id)
    assert "already posted" in o.error
    assert len(world.sim.state.notes(13_400)) == 1  # nothing posted twice


def test_a_session_without_a_psa_gets_the_local_outcomes(world, worker):
    sid = world.session(linked=False)
    resolved = wait_for_outcome(enqueue_resolve(None, sid, "Stored only."), timeout=20)
    assert (resolved.status, resolved.http_status, resolved.external_id) == ("resolved_local", 200, None)
    assert "no PSA is linked" in resolved.status_transition_skipped_reason
    escalated = wait_for_outcome(enqueue_escalate(None, world.session(linked=False), "## Problem\nx"), timeout=20)
    assert (escalated.status, escalated.http_status) == ("escalated_local", 200)


def test_no_target_status_configured_is_resolved_with_the_skipped_reason(world, worker):
    with session_scope() as db:
        admin.set_preferences(db, world.account_id, {"cw_escalated_status_id": None})
    sid = world.session(13_500)
    o = wait_for_outcome(enqueue_escalate(None, sid, "## Problem\nVPN."), timeout=20)
    assert (o.status, o.http_status) == ("escalated", 200)
    assert "cw_escalated_status_id is not set" in o.status_transition_skipped_reason
    assert o.external_id is not None and o.psa_status_id is None
    assert world.sim.state.status_of(13_500) != ESCALATED


def test_a_timeout_returns_the_202_pending_outcome_and_a_later_wait_the_result(world, worker):
    sid = world.session(13_600)
    _hold(world, 13_600, 2.0)
    job_id = enqueue_resolve(None, sid, "Slow PSA.")
    started = time.monotonic()
    o = wait_for_outcome(job_id, timeout=0.4)
    waited = time.monotonic() - started
    assert (o.status, o.http_status, o.job_id) == ("pending", 202, job_id)
    assert 0.35 <= waited < 3  # the timeout, not the 2 s hold (generous: a loaded machine)
    assert wait_for_outcome(job_id, timeout=20).status == "resolved"
    # and a finished job answers at once, without waiting
    started = time.monotonic()
    assert wait_for_outcome(job_id, timeout=20).status == "resolved"
    assert time.monotonic() - started < 2


def test_a_killed_listener_connection_still_returns_the_right_outcome(world, worker):
    # given a waiter on a job held at the PSA, and a listener that is listening
    sid = world.session(13_700)
    _hold(world, 13_700, 1.5)
    job_id = enqueue_resolve(None, sid, "Survive the kill.")
    lst = listener()
    thread, box = _in_thread(wait_for_outcome, job_id, timeout=30)
    harness.wait_for(lambda: lst.waiting() >= 1 and lst.listening(), timeout=10, message="waiter subscribed")
    old_pid, connects = lst.backend_pid, lst.connects
    # when its connection is killed mid-wait
    assert _admin_sql("SELECT pg_terminate_backend(%s)", old_pid) == [(True,)]
    # then it reconnects, and the waiter still gets the verified outcome
    thread.join(30)
    assert box["value"].status == "resolved", box
    harness.wait_for(lst.listening, timeout=10, message="listener back")
    assert lst.connects > connects and lst.backend_pid != old_pid


def test_a_notification_missed_while_reconnecting_is_made_up_by_one_read(world, worker, monkeypatch):
    # given a waiter that would not poll on its own for a minute
    monkeypatch.setattr(outcome_wait, "DEGRADED_POLL_SECONDS", 60.0)
    sid = world.session(13_800)
    _hold(world, 13_800, 1.0)
    job_id = enqueue_resolve(None, sid, "Missed NOTIFY.")
    lst = listener()
    thread, box = _in_thread(wait_for_outcome, job_id, timeout=40)
    harness.wait_for(lambda: lst.waiting() >= 1 and lst.listening(), timeout=10, message="waiter subscribed")
    # when the listener loses its connection and cannot reconnect until the job has finished
    gate, connect = threading.Event(), lst._connect
    monkeypatch.setattr(lst, "_connect", lambda: (gate.wait(30), connect())[1])
    _admin_sql("SELECT pg_terminate_backend(%s)", lst.backend_pid)
    harness.wait_for(lambda: not lst.listening(), timeout=10, message="listener down")
    assert wait_terminal(job_id).state == "succeeded"  # its NOTIFY went to nobody
    time.sleep(0.3)
    assert thread.is_alive()  # the waiter did not see it by itself
    # then reconnecting wakes every waiter for one read, and this one returns the outcome
    released = time.monotonic()
    gate.set()
    thread.join(10)
    assert box["value"].status == "resolved", box
    assert time.monotonic() - released < 5


def test_a_job_finishing_between_the_first_read_and_the_subscription_is_not_missed(world, worker, monkeypatch):
    # given a queued job (no message: only the test changes it) and no polling to hide a miss
    monkeypatch.setattr(outcome_wait, "DEGRADED_POLL_SECONDS", 60.0)
    job_id = _unpublished_job(world.session(linked=False))
    lst = listener()
    subscribe = lst.subscribe

    def finish_then_subscribe(channel, row_id, waker):
        # the job ends (without any NOTIFY reaching us) right before we subscribe
        with get_engine().begin() as conn:
            conn.execute(text("UPDATE writeback_jobs SET state = 'succeeded', finished_at = now(), "
                              "result = '{\"outcome\": \"local\"}' WHERE id = :id"), {"id": job_id})
        subscribe(channel, row_id, waker)

    monkeypatch.setattr(lst, "subscribe", finish_then_subscribe)
    started = time.monotonic()
    o = wait_for_outcome(job_id, timeout=30)
    assert o.status == "resolved_local" and time.monotonic() - started < 5  # not the 30 s timeout


def test_cancelling_a_job_wakes_its_waiter_with_the_cancelled_outcome(world, worker, monkeypatch):
    monkeypatch.setattr(outcome_wait, "DEGRADED_POLL_SECONDS", 60.0)
    job_id = _unpublished_job(world.session(linked=False))
    lst = listener()
    thread, box = _in_thread(wait_for_outcome, job_id, timeout=30)
    harness.wait_for(lambda: lst.waiting() >= 1 and lst.listening(), timeout=10, message="waiter subscribed")
    assert repair.cancel(job_id, actor="test", reason="customer withdrew").ok
    thread.join(5)
    o = box["value"]
    assert (o.status, o.http_status) == ("cancelled", 409)
    assert "customer withdrew" in o.error


def test_the_asyncio_waiter_does_not_block_the_event_loop(world, worker):
    sid = world.session(13_900)
    _hold(world, 13_900, 0.5)
    job_id = enqueue_resolve(None, sid, "Async.")

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        o = await async_wait_for_outcome(job_id, timeout=20)
        task.cancel()
        return o, ticks

    o, ticks = asyncio.run(main())
    assert (o.status, o.http_status) == ("resolved", 200)
    assert ticks >= 20  # the loop kept running for the whole ~0.5 s wait


def test_unknown_ids_and_sessions_are_clear_not_found_errors(world):
    with pytest.raises(NotFoundError, match="unknown writeback job 999999"):
        outcome(999_999)
    with pytest.raises(NotFoundError, match="unknown writeback job 999999"):
        wait_for_outcome(999_999, timeout=1)
    sid = world.session(linked=False)
    with pytest.raises(NotFoundError, match=f"session {sid} has no resolve writeback"):
        outcome_for_session(sid, "resolve")
    with pytest.raises(RequestError, match="kind must be one of"):
        outcome_for_session(sid, "resolved")


def test_ids_and_timeouts_from_a_request_are_validated_with_clear_errors(world):
    with pytest.raises(RequestError, match="job_id must be a positive integer, got str"):
        wait_for_outcome("1; DROP TABLE writeback_jobs", timeout=1)
    with pytest.raises(RequestError, match="job_id must be a positive integer, got -3"):
        outcome(-3)
    with pytest.raises(RequestError, match="timeout must be a finite number of seconds"):
        wait_for_outcome(1, timeout=float("nan"))
    with pytest.raises(RequestError, match="timeout must be a finite number"):
        asyncio.run(async_wait_for_outcome(1, timeout="soon"))
    job_id = _unpublished_job(world.session(linked=False))
    assert wait_for_outcome(str(job_id), timeout=0).job_id == job_id  # a path parameter, still text


def test_outcome_for_session_is_the_latest_job_of_that_kind(world, worker):
    sid = world.session(13_950)
    job_id = enqueue_resolve(None, sid, "By session.")
    wait_for_outcome(job_id, timeout=20)
    o = outcome_for_session(sid, "resolve")
    assert (o.job_id, o.status) == (job_id, "resolved")
    assert o.to_dict()["psa_status_verified_at"].endswith("+00:00")


def _readme_endpoints() -> dict:
    """The README's worked example, executed as written."""
    readme = (harness.ROOT / "README.md").read_text()
    start = readme.index("**The spec's three endpoints**")
    code = readme[readme.index("```python\n", start) + len("```python\n"):readme.index("```", readme.index(
        "```python\n", start) + 10)]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_the_readme_endpoints_answer_200_then_409_and_local_and_bad_input(world, worker):
    api = _readme_endpoints()
    sid = world.session(13_990)
    status, body = api["resolution_post"](sid, {"markdown": "Fixed via README."}, "req-1")
    assert (status, body["status"], body["psa_status_id"]) == (200, "resolved", RESOLVED)
    # the client retries the same request: same job, same answer
    assert api["resolution_post"](sid, {"markdown": "Fixed via README."}, "req-1") == (status, body)
    status, again = api["resolution_post"](sid, {"markdown": "Once more."}, "req-2")
    assert (status, again["status"], again["job_id"]) == (409, "conflict", body["job_id"])
    status, local = api["escalation_post"](world.session(linked=False), {"markdown": "## Problem\nx"}, "req-3")
    assert (status, local["status"]) == (200, "escalated_local")
    assert api["escalation_post"](sid, {"markdown": "  "}, "req-4")[0] == 400
    assert api["resolution_post"](999_999, {"markdown": "x"}, "req-5")[0] == 404


def test_shutdown_closes_the_listening_connection_and_the_next_waiter_starts_another(world):
    lst = listener().start()
    assert lst.wait_listening(10)
    pid = lst.backend_pid
    outcome_listener.shutdown()
    harness.wait_for(lambda: not _admin_sql("SELECT 1 FROM pg_stat_activity WHERE pid = %s", pid), timeout=10,
                     message="listener backend gone")
    assert listener() is not lst
