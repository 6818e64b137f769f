"""What one tenant's PSA can make the worker wait for, and for how long: the in-flight cap
per connection (shared by every worker process), Retry-After capped, one alert for a long
pause, deferrals kept out of the backoff, and the stuck check seeing a job parked for years.
Real PostgreSQL, real Redis, real worker processes, simulators over HTTP."""
from __future__ import annotations

import datetime as dt
import os
import time
import uuid
from pathlib import Path

import pytest
import redis
from sqlalchemy import select, update

from models import Alert, AlertKind, JobKind, JobState, WritebackJob, utcnow
from models.db import session_scope
from providers.errors import PsaTransientError
from providers.simulators.connectwise import SimulatorServer
from tasks import enqueue_resolve, ratelimit, store
from tasks.enqueue import build_job
from tests import harness
from tests.factories import RESOLVED, World, attempts, job, wait_terminal
from tests.harness import wait_for


@pytest.fixture()
def private_broker(db_clean):
    """The test's own redis-server (harness.private_broker)."""
    with harness.private_broker() as server:
        yield server


def start_workers(broker: harness.RedisServer, tmp: Path, count: int, **env: str) -> list[harness.WorkerProcess]:
    base = {**os.environ, "CELERY_BROKER_URL": broker.url, **env}
    base.pop("CELERY_REDIS_KEY_PREFIX", None)  # a private server needs no prefix
    return [harness.WorkerProcess(base, concurrency=4, log_path=tmp / f"worker-{n}.log").start()
            for n in range(count)]


@pytest.fixture()
def other_sim():
    server = SimulatorServer().start()
    yield server
    server.stop()


def alerts(kind: str) -> list[Alert]:
    with session_scope() as db:
        return list(db.scalars(select(Alert).where(Alert.kind == kind).order_by(Alert.id)))


def test_a_slow_tenant_holds_at_most_its_cap_of_threads_across_two_workers(private_broker, sim, other_sim,
                                                                          tmp_path):
    # given tenant A's PSA answering every call after 0.25 s, tenant B's at once, and two
    # worker processes (4 threads each) sharing a cap of 2 jobs in flight per connection
    a, b = World.create(sim, account_id=1), World.create(other_sim, account_id=2)
    sim.state.latency = 0.25
    workers = start_workers(private_broker, tmp_path, 2, PSA_MAX_INFLIGHT_PER_CONNECTION="2")
    try:
        # when A enqueues 6 resolves, and B one while A's are running
        a_jobs = [enqueue_resolve(None, a.session(8300 + n), f"Tenant A note {n}.") for n in range(6)]
        wait_for(lambda: sim.state.in_flight >= 1, timeout=15, message="A's first call")
        b_job = wait_terminal(enqueue_resolve(None, b.session(8400), "Tenant B's one resolve."), timeout=15)
        # then B is not stuck behind A: done at once, verified
        assert b_job.state == "succeeded" and b_job.result["outcome"] == "verified"
        assert (b_job.finished_at - b_job.created_at).total_seconds() < 3.0
        rows = [wait_terminal(i, timeout=60) for i in a_jobs]
    finally:
        for w in workers:
            w.stop()
    # and A's PSA never saw more than 2 of its jobs at once, though 8 threads were free
    assert sim.state.max_in_flight == 2
    assert all(r.state == "succeeded" for r in rows), [(r.id, r.state, r.error_message) for r in rows]
    assert all(sim.state.status_of(8300 + n) == RESOLVED and len(sim.state.notes(8300 + n)) == 1 for n in range(6))
    # jobs over the cap were deferred: no HTTP call, no attempt spent, the attempt row says why
    deferred, ran_on = 0, set()
    for r in rows:
        history = attempts(r.id)
        ran_on.update(x.worker for x in history)
        waits = [x for x in history if x.outcome == "deferred"]
        assert all(x.error_type == "InflightCapReached" and x.http_status is None and x.psa_ms is None
                   for x in waits)
        assert all("PSA_MAX_INFLIGHT_PER_CONNECTION" in x.error_message for x in waits)
        assert r.max_attempts == 8 + len(waits)
        deferred += len(waits)
    assert deferred >= 1
    assert len(ran_on) == 2  # both worker processes took A's jobs: the cap is theirs together
    # and every slot was given back: the connection's in-flight set is empty
    client = redis.Redis.from_url(private_broker.url)
    assert all(client.zcard(k) == 0 for k in client.scan_iter(match="*psa-writeback:inflight:*"))


def test_jobs_behind_the_cap_are_woken_as_slots_free_not_claimed_again_and_again(private_broker, sim, tmp_path):
    # given a cap of 1 job in flight, a PSA answering every call after 0.15 s (so a job takes
    # ~0.8 s), and the waiting jobs' recheck at its default 300 s: only wake-ups bring them back
    world = World.create(sim)
    sim.state.latency = 0.15
    [w] = start_workers(private_broker, tmp_path, 1, PSA_MAX_INFLIGHT_PER_CONNECTION="1")
    try:
        # when 6 resolves are enqueued at once
        ids = [enqueue_resolve(None, world.session(8700 + n), f"Queued note {n}.") for n in range(6)]
        rows = [wait_terminal(i, timeout=60) for i in ids]
    finally:
        w.stop()
    # then all went through, one at a time, long before any recheck
    assert all(r.state == "succeeded" for r in rows), [(r.id, r.state, r.error_message) for r in rows]
    assert sim.state.max_in_flight == 1
    assert max(r.finished_at for r in rows) - min(r.created_at for r in rows) < dt.timedelta(seconds=45)
    # and no job was claimed and deferred more than once: it waited to be woken (the old
    # doubling retry, 0.5 s to 30 s, deferred the last of them 3-4 times)
    deferrals = {r.id: [x for x in attempts(r.id) if x.outcome == "deferred"] for r in rows}
    assert max(len(d) for d in deferrals.values()) == 1, {k: len(v) for k, v in deferrals.items()}
    assert sum(len(d) for d in deferrals.values()) >= 3
    # and nothing is left waiting or holding a slot in Redis
    client = redis.Redis.from_url(private_broker.url)
    assert all(client.zcard(k) == 0 for k in client.scan_iter(match="*psa-writeback:waiting:*"))
    assert all(client.zcard(k) == 0 for k in client.scan_iter(match="*psa-writeback:inflight:*"))


def test_a_waiting_job_whose_wake_up_is_lost_comes_back_through_the_sweeper(private_broker, sim, tmp_path,
                                                                            monkeypatch):
    from models import PsaConnection
    from tasks import sweeper

    # given a cap of 1 held by a worker that died without giving its slot back (an hour's
    # lease), and a recheck of 1 s
    world = World.create(sim)
    with session_scope() as db:
        base_url = db.get(PsaConnection, world.connection_id).base_url
    client = redis.Redis.from_url(private_broker.url)
    inflight = f"psa-writeback:inflight:{ratelimit.connection_key(world.connection_id, base_url)}"
    client.zadd(inflight, {"dead-worker": time.time() + 3600})
    [w] = start_workers(private_broker, tmp_path, 1, PSA_MAX_INFLIGHT_PER_CONNECTION="1",
                        PSA_INFLIGHT_RECHECK_SECONDS="1")
    try:
        # when a job of that connection is refused a slot and waits
        waiting = enqueue_resolve(None, world.session(8750), "The job whose wake-up is lost.")
        wait_for(lambda: any(x.error_type == "InflightCapReached" for x in attempts(waiting)), timeout=15,
                 message="the job to wait for a slot")
        assert client.zrange(inflight.replace(":inflight:", ":waiting:"), 0, -1) == [str(waiting).encode()]
        # and the slot frees without the release that would wake it (its holder's lease expired)
        client.zrem(inflight, "dead-worker")
        time.sleep(2.5)
        assert job(waiting).state == "retrying" and sim.state.notes(8750) == []  # nobody woke it
        # then the sweeper (beat) re-publishes the job once it is due, and it runs
        monkeypatch.setenv("SWEEP_REPUBLISH_AFTER_SECONDS", "1")
        wait_for(lambda: sweeper.sweep()["published"], timeout=10, message="the sweeper to re-publish it")
        row = wait_terminal(waiting, timeout=20)
    finally:
        w.stop()
    assert row.state == "succeeded" and sim.state.status_of(8750) == RESOLVED


def test_a_real_failure_after_deferrals_waits_the_first_backoff_step(private_broker, sim, tmp_path):
    # given a backoff of 4 s doubling (so step 1 waits 2-4 s, step 2 waits 4-8 s), and
    # ticket 8501 whose PSA answers 500 to everything
    world = World.create(sim)
    sim.state.add_fault(action="error", status=429, retry_after=3, ticket_id=8500, times=1)
    sim.state.add_fault(action="error", status=500, ticket_id=8501, times=-1)
    [w] = start_workers(private_broker, tmp_path, 1, RETRY_BASE_SECONDS="4", RETRY_FACTOR="2",
                        RETRY_MAX_DELAY_SECONDS="100", POST_SETTLE_SECONDS="0.5")
    try:
        # when another job's 429 (Retry-After 3 s) pauses the connection
        first = enqueue_resolve(None, world.session(8500), "The job that hears the 429.")
        wait_for(lambda: any(x.http_status == 429 for x in attempts(first)), timeout=15, message="the 429")
        # and the job on 8501 is deferred by that pause, then fails for real
        victim = enqueue_resolve(None, world.session(8501), "The job deferred, then failing.")
        history = wait_for(lambda: len(h := [x for x in attempts(victim) if x.outcome != "running"]) >= 2 and h,
                           timeout=20, message="a deferral and a real failure")
        row = job(victim)
    finally:
        w.stop()
    deferral, failure = history[0], history[1]
    assert (deferral.http_status, failure.http_status) == (None, 500)
    # then its wait is the first step's (2-4 s), not the second's: the deferral is no failure
    if row.state == "retrying" and row.attempts == 2:
        delay = (row.next_attempt_at - failure.finished_at).total_seconds()
    else:  # it ran again already: its second failure is the second step, the only other kind
        third = attempts(victim)[2]
        delay = (third.started_at - failure.finished_at).total_seconds()
    assert 2.0 <= delay <= 4.5, delay
    # and the history tells the deferral from the failure
    assert (deferral.outcome, deferral.error_type) == ("deferred", "CoolingDown")
    assert failure.outcome == "retry"


def test_a_retry_after_of_years_is_capped_and_raises_one_alert(private_broker, sim, tmp_path):
    # given a 429 answering `Retry-After: 99999999` (about three years), and a worker of the
    # test's own (its jobs stay retrying for 15 minutes: their messages go with its broker)
    world = World.create(sim)
    sim.state.add_fault(action="error", status=429, retry_after=99999999, ticket_id=8600, times=1)
    [w] = start_workers(private_broker, tmp_path, 1)
    key = None
    try:
        # when a job hears it (and later two more jobs of the same connection come)
        first = enqueue_resolve(None, world.session(8600), "The 429's job.")
        wait_for(lambda: job(first).state == "retrying", timeout=15, message="the 429")
        with session_scope() as db:
            from models import PsaConnection
            key = ratelimit.connection_key(world.connection_id, db.get(PsaConnection, world.connection_id).base_url)
        # then the pause is PSA_MAX_RETRY_AFTER_SECONDS (900 s), not three years
        left = redis.Redis.from_url(private_broker.url).pttl(f"psa-writeback:cooldown:{key}") / 1000
        assert 890 <= left <= 900
        later = [enqueue_resolve(None, world.session(8601 + n), "Deferred.") for n in range(2)]
        for j in later:
            wait_for(lambda: [x for x in attempts(j) if x.outcome == "deferred"], timeout=15, message="deferrals")
        # and so is every job's wait
        for j in [first, *later]:
            row, last = job(j), attempts(j)[-1]
            assert row.state == "retrying"
            assert 890 <= (row.next_attempt_at - last.finished_at).total_seconds() <= 901
        # and one alert says so, for the job whose 429 started it (the deferred ones raise none)
        [alert] = wait_for(lambda: alerts("long_deferral"), timeout=10, message="the long_deferral alert")
        assert alert.job_id == first and alert.connection_id == world.connection_id
        assert "99999999" in alert.message and "900" in alert.message
        assert alert.details["wait_seconds"] == 900
        time.sleep(0.5)
        assert len(alerts("long_deferral")) == 1
    finally:
        w.stop()


def test_the_claim_counts_deferrals_so_the_backoff_skips_them(world):
    # given a job whose first three executions were deferred by our own limiter
    with session_scope() as db:
        job_id = build_job(db, JobKind.RESOLVE, session_id=world.session(8700), markdown="x").id
    throttled = ratelimit.CoolingDown("cooling down", retry_after=0)
    for _ in range(3):
        claimed = store.claim(job_id, uuid.uuid4().hex, "task", "test-worker")
        store.schedule_retry(claimed, 0, throttled, None, "note", spend_attempt=False)
    # then the fourth execution is real failure #1, and after a real failure, #2
    claimed = store.claim(job_id, uuid.uuid4().hex, "task", "test-worker")
    assert (claimed.attempt_no, claimed.deferrals, claimed.failure_no, claimed.max_attempts) == (4, 3, 1, 11)
    store.schedule_retry(claimed, 0, PsaTransientError("500"), 500, "note")
    claimed = store.claim(job_id, uuid.uuid4().hex, "task", "test-worker")
    assert (claimed.attempt_no, claimed.deferrals, claimed.failure_no) == (5, 3, 2)
    assert [x.outcome for x in attempts(job_id)] == ["deferred"] * 3 + ["retry", "running"]


def test_the_stuck_check_sees_a_job_parked_years_out(world):
    from worker.alerts import run_checks

    # given a retrying job due in three years (written before the cap, or by hand), and one
    # due in ten minutes (an ordinary backoff)
    with session_scope() as db:
        parked = build_job(db, JobKind.RESOLVE, session_id=world.session(8800), markdown="x").id
        fine = build_job(db, JobKind.RESOLVE, session_id=world.session(8801), markdown="x").id
        for job_id, due in ((parked, utcnow() + dt.timedelta(days=1100)), (fine, utcnow() + dt.timedelta(minutes=10))):
            db.execute(update(WritebackJob).where(WritebackJob.id == job_id)
                       .values(state=JobState.RETRYING.value, next_attempt_at=due, attempts=1))
    # when the periodic check runs
    assert run_checks()["stuck"] == 1
    # then the parked job has a stuck alert saying why; the other none
    [alert] = alerts(AlertKind.JOB_STUCK.value)
    assert alert.job_id == parked
    assert "further out than any retry" in alert.message
