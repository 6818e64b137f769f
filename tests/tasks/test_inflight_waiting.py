"""Jobs over a connection's in-flight cap wait in Redis, oldest first, and a job leaving hands
its slot to the oldest one (issue 14: a backlog behind a slow PSA used to be claimed and
deferred again every few seconds, job by job). Real Redis and PostgreSQL; the worker-level
flow is in test_tenant_limits."""
from __future__ import annotations

import os
import time

import redis
from sqlalchemy import update

from models import JobKind, JobState, WritebackJob, utcnow
from models.db import session_scope
from tasks import ratelimit, runner
from tasks.enqueue import build_job
from tests.factories import World, job


def _client() -> redis.Redis:
    return redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])


def _waiting(key: str) -> list[str]:
    return [m.decode() for m in _client().zrange(ratelimit._key("waiting", key), 0, -1)]


def _slots(key: str) -> set[str]:
    return {m.decode() for m in _client().zrange(ratelimit._key("inflight", key), 0, -1)}


def test_jobs_over_the_cap_wait_oldest_first_and_a_release_hands_its_slot_to_the_oldest(limiter_keys):
    key = limiter_keys()
    # given a cap of 2 held by jobs 1 and 2
    running = [ratelimit.counting_against(key, token=f"t{n}", hold=60, cap=2, job=n) for n in (1, 2)]
    slots = []
    for block in running:
        slots.append(block.__enter__())
        ratelimit.gate("connectwise", "list_notes")
    # when jobs 3, 4 and 5 are refused, in that order, and wait (the runner registers a job
    # once its deferral is written); and 3 is refused again later
    for n in (3, 4, 5, 3):
        assert ratelimit.admit(key, 5, f"t{n}", 60, cap=2, job=n)[0] == "full"
        assert ratelimit.wait_for_slot(key, n, 2) == []
    # then they wait in that order: asking again keeps a job's place
    assert _waiting(key) == ["3", "4", "5"]
    # when job 2 leaves
    running[1].__exit__(None, None, None)
    # then its slot is kept for job 3, the oldest: a newcomer is still refused (and queues last)
    assert slots[1].woken == [3]
    assert _slots(key) == {"t1", "w:3"}
    assert ratelimit.admit(key, 5, "t6", 60, cap=2, job=6)[0] == "full"
    assert ratelimit.wait_for_slot(key, 6, 2) == []
    assert _waiting(key) == ["4", "5", "6"]
    # and job 3, woken, takes the slot kept for it
    assert ratelimit.admit(key, 5, "t3", 60, cap=2, job=3)[0] == "go"
    assert _slots(key) == {"t1", "t3"}
    # a woken job that no longer needs its slot (finished meanwhile) hands it on to the next
    running[0].__exit__(None, None, None)
    assert slots[0].woken == [4]
    assert ratelimit.release(key, "", 2, dropped=4) == [5]
    assert _slots(key) == {"t3", "w:5"} and _waiting(key) == ["6"]


def test_a_release_fills_every_free_slot_and_a_kept_slot_nobody_takes_frees_itself(limiter_keys, monkeypatch):
    key = limiter_keys()
    monkeypatch.setattr(ratelimit, "WOKEN_SLOT_HOLD", 0.3)
    # given a cap of 3 with one job in flight and three waiting (the other slots' holders died)
    assert ratelimit.admit(key, 1, "t1", 60, cap=3, job=1)[0] == "go"
    assert ratelimit.admit(key, 1, "dead-a", 0.2, cap=3)[0] == "go"
    assert ratelimit.admit(key, 1, "dead-b", 0.2, cap=3)[0] == "go"
    for n in (7, 8, 9):
        assert ratelimit.admit(key, 1, f"t{n}", 60, cap=3, job=n)[0] == "full"
        assert ratelimit.wait_for_slot(key, n, 3) == []
    time.sleep(0.25)  # the dead holders' leases run out
    # when job 1 leaves, all three slots go to the three oldest waiting jobs
    assert ratelimit.release(key, "t1", 3) == [7, 8, 9]
    assert _slots(key) == {"w:7", "w:8", "w:9"} and _waiting(key) == []
    # and a kept slot whose job never comes is free again after the hold
    time.sleep(0.35)
    assert ratelimit.admit(key, 1, "t10", 60, cap=3, job=10)[0] == "go"


def test_the_waker_makes_the_woken_job_due_and_hands_a_finished_jobs_slot_on(db_clean, sim, limiter_keys,
                                                                             monkeypatch):
    key = limiter_keys()
    world = World.create(sim)
    with session_scope() as db:
        ids = [build_job(db, JobKind.RESOLVE, session_id=world.session(8800 + n), markdown=f"Waiting note {n}.").id
               for n in range(2)]
    finished, waiting = ids
    later = utcnow().replace(year=2099)
    with session_scope() as db:
        db.execute(update(WritebackJob).where(WritebackJob.id == finished).values(state=JobState.SUCCEEDED.value))
        db.execute(update(WritebackJob).where(WritebackJob.id == waiting)
                   .values(state=JobState.RETRYING.value, next_attempt_at=later, published_at=later))
    # given both jobs waiting for the one slot, the finished one first (it finished by another way)
    assert ratelimit.admit(key, 1, "holder", 60, cap=1, job=1)[0] == "go"
    for n in (finished, waiting):
        assert ratelimit.admit(key, 1, f"t{n}", 60, cap=1, job=n)[0] == "full"
        assert ratelimit.wait_for_slot(key, n, 1) == []
    published: list[tuple] = []
    monkeypatch.setattr(runner, "publish", lambda *a, **kw: published.append((a, kw)) or True)
    # when the holder leaves and the runner wakes whom its release named
    woken = ratelimit.release(key, "holder", 1)
    assert woken == [finished]
    runner._wake(key, woken, 1)
    # then the finished job's slot went on to the waiting job, which is due now and published
    # first in line (priority 0)
    assert _slots(key) == {f"w:{waiting}"}
    assert published == [((waiting, "resolve"), {"priority": 0})]
    row = job(waiting)
    assert row.state == "retrying" and row.next_attempt_at <= utcnow() and row.published_at <= utcnow()
    assert job(finished).state == "succeeded"


def test_a_slot_freed_between_the_refusal_and_the_wait_goes_to_the_oldest_waiting_job(limiter_keys):
    key = limiter_keys()
    # given job 1 holding the only slot, and job 2 waiting already
    assert ratelimit.admit(key, 1, "t1", 60, cap=1, job=1)[0] == "go"
    assert ratelimit.admit(key, 1, "t2", 60, cap=1, job=2)[0] == "full"
    assert ratelimit.wait_for_slot(key, 2, 1) == []
    # when job 3 is refused, and job 1 leaves before 3's deferral is written (its release
    # hands the slot to 2; then 2's kept slot is given up: it finished some other way)
    assert ratelimit.admit(key, 1, "t3", 60, cap=1, job=3)[0] == "full"
    assert ratelimit.release(key, "t1", 1) == [2]
    assert ratelimit.release(key, "", 1, dropped=2) == []  # nobody waits yet: the slot is free
    # then job 3, registering, is handed the free slot at once: nobody is left waiting for a
    # release that already happened
    assert ratelimit.wait_for_slot(key, 3, 1) == [3]
    assert _slots(key) == {"w:3"} and _waiting(key) == []


def test_without_redis_nothing_waits(monkeypatch):
    monkeypatch.setenv("RATE_LIMIT_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    monkeypatch.setattr(ratelimit, "_failed_at", 0.0)
    try:
        assert ratelimit.admit("any", 1, "t", 60, cap=1, job=1) == ("go", 0.0)
        assert ratelimit.release("any", "t", 1) == [] and ratelimit.wait_for_slot("any", 1, 1) == []
    finally:
        monkeypatch.setattr(ratelimit, "_failed_at", 0.0)


def test_with_the_cap_off_no_job_waits_or_is_woken(limiter_keys):
    key, cap = limiter_keys(), 0
    for n in range(5):
        assert ratelimit.admit(key, 1, f"t{n}", 60, cap=cap, job=n)[0] == "go"
    assert ratelimit.release(key, "t0", cap) == [] and _waiting(key) == []
