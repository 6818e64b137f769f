"""Guarantee 3 at the database: the claim is atomic, duplicates and late executions are
fenced off, jobs of one ticket go one at a time in id order, and every write after the
claim survives being retried after a lost commit reply. Real PostgreSQL, no broker."""
from __future__ import annotations

import datetime as dt
import threading
import uuid

import pytest
from sqlalchemy import select, update

from models import AttemptOutcome, JobKind, JobState, WritebackAttempt, WritebackJob, utcnow
from models.db import session_scope
from tasks import store
from tasks.enqueue import build_job
from tasks.errors import LeaseLost
from tasks.store import ClaimedJob, ClaimRefusal


def make_job(sid: int, kind: JobKind = JobKind.TRANSITION_STATUS, **intent) -> int:
    """A job row as enqueue writes it, but never published (no worker may take it)."""
    intent = intent or ({"status_id": 9} if kind is JobKind.TRANSITION_STATUS else {"markdown": "x"})
    with session_scope() as db:
        return build_job(db, kind, session_id=sid, **intent).id


def claim(job_id: int, token: str | None = None) -> ClaimedJob | ClaimRefusal:
    return store.claim(job_id, token or uuid.uuid4().hex, "task-id", "test-worker")


def expire_lease(job_id: int) -> None:
    with session_scope() as db:
        db.execute(update(WritebackJob).where(WritebackJob.id == job_id)
                   .values(lease_until=utcnow() - dt.timedelta(seconds=1)))


def outcomes(job_id: int) -> list[str]:
    with session_scope() as db:
        return list(db.scalars(select(WritebackAttempt.outcome).where(WritebackAttempt.job_id == job_id)
                               .order_by(WritebackAttempt.attempt_no)))


def finish(job: ClaimedJob) -> None:
    store.finish(job, JobState.SUCCEEDED, AttemptOutcome.SUCCEEDED, result={"outcome": "verified"})


def test_of_sixteen_simultaneous_claims_exactly_one_wins(world):
    job_id = make_job(world.session(3001))
    barrier, results = threading.Barrier(16), []

    def go() -> None:
        barrier.wait()
        results.append(claim(job_id))

    threads = [threading.Thread(target=go) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, ClaimedJob)]
    assert len(winners) == 1
    assert sorted({r.reason for r in results if isinstance(r, ClaimRefusal)}) == ["running"]
    assert outcomes(job_id) == ["running"]


def test_a_finished_job_refuses_every_later_claim(world):
    job_id = make_job(world.session(3002))
    finish(claim(job_id))
    refusal = claim(job_id)
    assert isinstance(refusal, ClaimRefusal) and (refusal.reason, refusal.state) == ("terminal", "succeeded")
    with session_scope() as db:
        assert db.get(WritebackJob, job_id).attempts == 1


def test_a_running_refusal_says_when_the_lease_runs_out(world):
    job_id = make_job(world.session(3003))
    claim(job_id)
    refusal = claim(job_id)
    assert refusal.reason == "running"
    assert store.lease_seconds() - 2 < refusal.due_in <= store.lease_seconds()


def test_missing_wrong_kind_and_not_due_refusals(world):
    assert claim(424242).reason == "missing"
    job_id = make_job(world.session(3004))
    wrong = store.claim(job_id, "t", None, None, kind="resolve")
    assert (wrong.reason, wrong.state) == ("wrong_kind", "transition_status")
    with session_scope() as db:
        db.execute(update(WritebackJob).where(WritebackJob.id == job_id)
                   .values(next_attempt_at=utcnow() + dt.timedelta(seconds=30)))
    not_due = claim(job_id)
    assert not_due.reason == "not_due" and 28 < not_due.due_in <= 30


def test_a_later_job_of_the_same_ticket_waits_until_the_earlier_one_is_terminal(world):
    sid = world.session(3005)
    first, second = make_job(sid, status_id=5), make_job(sid, status_id=9)
    assert claim(second).reason == "blocked"  # the earlier one is queued
    running = claim(first)
    assert isinstance(running, ClaimedJob)
    assert claim(second).reason == "blocked"  # the earlier one runs
    store.schedule_retry(running, 0, RuntimeError("503"), 503, "transition")
    assert claim(second).reason == "blocked"  # the earlier one waits for a retry
    finish(claim(first))
    assert isinstance(claim(second), ClaimedJob)


def test_racing_claims_of_two_jobs_of_one_ticket_never_run_both(world):
    sid = world.session(3006)
    for _ in range(10):
        a, b = make_job(sid, status_id=5), make_job(sid, status_id=9)
        barrier, won = threading.Barrier(2), {}

        def go(job_id: int) -> None:
            barrier.wait()
            won[job_id] = claim(job_id)

        threads = [threading.Thread(target=go, args=(j,)) for j in (b, a)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert isinstance(won[a], ClaimedJob) and isinstance(won[b], ClaimRefusal)
        finish(won[a])
        finish(claim(b))


def test_an_expired_lease_passes_the_job_on_and_fences_the_old_execution(world):
    job_id = make_job(world.session(3007))
    old = claim(job_id)
    expire_lease(job_id)
    new = claim(job_id)
    assert isinstance(new, ClaimedJob) and new.attempt_no == 2
    assert outcomes(job_id) == ["abandoned", "running"]
    # the old execution wakes up: none of its writes land
    with pytest.raises(LeaseLost):
        store.record_note_intent(old, [])
    with pytest.raises(LeaseLost):
        store.renew_lease(old)
    with pytest.raises(LeaseLost):
        finish(old)
    finish(new)
    assert outcomes(job_id) == ["abandoned", "succeeded"]


def test_a_claim_run_again_after_its_commit_landed_does_not_count_twice(world):
    # db_retry re-runs the whole claim when the reply to its COMMIT was lost
    job_id = make_job(world.session(3008))
    first = claim(job_id, "token-1")
    again = claim(job_id, "token-1")
    assert isinstance(again, ClaimedJob) and again.attempt_no == first.attempt_no == 1
    assert outcomes(job_id) == ["running"]


def test_finish_and_retry_run_again_after_their_commit_landed_are_no_ops(world):
    job_id = make_job(world.session(3009))
    job = claim(job_id)
    due = store.schedule_retry(job, 1.0, RuntimeError("503"), 503, "transition")
    assert store.schedule_retry(job, 1.0, RuntimeError("503"), 503, "transition") is not None  # no LeaseLost
    with session_scope() as db:
        assert db.get(WritebackJob, job_id).next_attempt_at == due
    expire_lease(job_id)
    with session_scope() as db:
        db.execute(update(WritebackJob).where(WritebackJob.id == job_id).values(next_attempt_at=utcnow()))
    job = claim(job_id)
    finish(job)
    finish(job)  # the same terminal write again: already there, not "lease lost"
    assert outcomes(job_id) == ["retry", "succeeded"]


def test_finish_names_the_tickets_next_job_also_when_run_again_after_its_commit_landed(world):
    # the task publishes that job at once; a finish retried after a lost reply must name it too
    sid = world.session(3010)
    first, second, third = (make_job(sid, status_id=s) for s in (5, 9, 7))
    job = claim(first)
    finish(job)
    assert job.scratch["next"] == (second, "transition_status")
    del job.scratch["next"]
    finish(job)  # already recorded by our own earlier try
    assert job.scratch["next"] == (second, "transition_status")
    # a claim re-run after its reply was lost has no attempt start: the statement-at-a-time path
    again = claim(second, "token-2")
    job = claim(second, "token-2")
    assert again.started_at is not None and job.started_at is None
    finish(job)
    assert job.scratch["next"] == (third, "transition_status")
    del job.scratch["next"]
    finish(job)
    assert job.scratch["next"] == (third, "transition_status")
    job = claim(third)
    finish(job)
    assert job.scratch["next"] is None


def test_a_deferral_gives_the_attempt_back_once_even_when_run_again(world):
    job_id = make_job(world.session(3011))
    job = claim(job_id)
    for _ in range(2):  # the second is a db_retry after a lost reply: no second attempt given back
        store.schedule_retry(job, 1.0, RuntimeError("throttled"), None, "transition", spend_attempt=False)
    with session_scope() as db:
        row = db.get(WritebackJob, job_id)
        assert (row.state, row.attempts, row.max_attempts) == ("retrying", 1, job.max_attempts + 1)
    assert outcomes(job_id) == ["deferred"]


def test_the_lease_is_never_shorter_than_a_psa_call_can_take(monkeypatch):
    monkeypatch.setenv("JOB_LEASE_SECONDS", "1")
    monkeypatch.setenv("PSA_CONNECT_TIMEOUT", "5")
    monkeypatch.setenv("PSA_READ_TIMEOUT", "30")
    assert store.lease_seconds() == 5 + 2 * 30 + 1
    monkeypatch.setenv("JOB_LEASE_SECONDS", "600")
    assert store.lease_seconds() == 600


def test_finish_says_whether_an_alert_about_the_job_or_its_credentials_is_open(world):
    # The alert hook skips its closing UPDATE when the outcome's write saw none open.
    from models import Alert

    quiet, alerted, auth = (make_job(world.session(t)) for t in (3301, 3302, 3303))
    with session_scope() as db:
        db.add(Alert(kind="job_stuck", job_id=alerted, message="stuck"))
        db.add(Alert(kind="auth_failed", connection_id=world.connection_id, job_id=None, message="keys"))
        resolved = Alert(kind="auth_failed", connection_id=world.connection_id + 1000, message="old",
                         resolved_at=utcnow())
        db.add(resolved)
    seen = {}
    for job_id in (quiet, alerted):
        job = claim(job_id)
        finish(job)
        seen[job_id] = job.scratch["open_alerts"]
    with session_scope() as db:  # once the connection's auth alert is closed, only the job's own count
        db.execute(update(Alert).where(Alert.kind == "auth_failed").values(resolved_at=utcnow()))
    job = claim(auth)
    finish(job)
    assert seen == {quiet: True, alerted: True} and job.scratch["open_alerts"] is False
