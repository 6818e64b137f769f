"""Guarantee 1, the safety net: the sweeper finds exactly the jobs whose message may be
lost (due but unclaimed, or running past their lease), never hands one job to two
sweepers, and re-publishes so a real worker finishes the job."""
from __future__ import annotations

import datetime as dt
import sys
import threading

import pytest
from sqlalchemy import update

from models import JobKind, WritebackJob, utcnow
from models.db import session_scope
from tasks import enqueue, sweeper
from tests.factories import job, wait_terminal
from tests.tasks.test_claim import claim, expire_lease, make_job

LONG_AGO = dt.timedelta(minutes=10)
ENQUEUE_MODULE = sys.modules["tasks.enqueue"]  # `tasks.enqueue` the attribute is the function


def set_row(job_id: int, **values) -> None:
    with session_scope() as db:
        db.execute(update(WritebackJob).where(WritebackJob.id == job_id).values(**values))


def lost(job_id: int) -> None:
    """As if its message vanished a while ago (publish failed, Redis restarted...)."""
    set_row(job_id, published_at=utcnow() - LONG_AGO, next_attempt_at=utcnow() - LONG_AGO)


def test_finds_due_unclaimed_and_lease_expired_jobs_and_nothing_else(world):
    queued_lost = make_job(world.session(3201))
    lost(queued_lost)
    just_published = make_job(world.session(3202))  # its message is surely still on its way
    retry_not_due = make_job(world.session(3203))
    set_row(retry_not_due, state="retrying", published_at=utcnow() - LONG_AGO,
            next_attempt_at=utcnow() + dt.timedelta(minutes=5))
    expired = make_job(world.session(3204))
    claim(expired)
    expire_lease(expired)
    set_row(expired, published_at=utcnow() - LONG_AGO)
    live = make_job(world.session(3205))
    claim(live)
    finished = make_job(world.session(3206))
    lost(finished)
    set_row(finished, state="succeeded")
    found = sweeper.find_lost(backlog=False)
    assert sorted(found) == sorted([(queued_lost, "transition_status"), (expired, "transition_status")])
    assert job(just_published).state == "queued" and job(live).state == "running"
    # marked as published: the next sweep leaves them alone until the window passes again
    assert sweeper.find_lost() == []


def test_a_job_queued_behind_a_live_one_on_its_ticket_is_not_republished(world):
    sid = world.session(3207)
    first, second = make_job(sid, status_id=5), make_job(sid, status_id=9)
    lost(first)
    lost(second)
    assert sweeper.find_lost() == [(first, "transition_status")]


def test_two_sweepers_at_once_never_take_the_same_job(world):
    ids = []
    for t in range(3300, 3360):
        ids.append(make_job(world.session(t)))
    for job_id in ids:
        lost(job_id)
    barrier, found = threading.Barrier(2), []

    def sweep_once() -> None:
        barrier.wait()
        found.append(sweeper.find_lost(limit=40))

    threads = [threading.Thread(target=sweep_once) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = ({i for i, _ in f} for f in found)
    assert not (a & b)
    assert a | b == set(ids)


def test_a_failed_publish_is_tried_again_by_a_later_sweep(world, monkeypatch):
    job_id = make_job(world.session(3208))
    lost(job_id)
    monkeypatch.setattr(sweeper, "queue_depth", lambda: None)  # broker down: depth unknown
    monkeypatch.setattr(ENQUEUE_MODULE, "publish", lambda job_id, kind, **_: False)
    assert sweeper.sweep() == {"found": 1, "published": 0, "queue_depth": -1}
    assert sweeper.sweep()["found"] == 0  # not again within the window
    set_row(job_id, published_at=utcnow() - LONG_AGO)
    sent = []
    monkeypatch.setattr(ENQUEUE_MODULE, "publish", lambda job_id, kind, **_: sent.append(job_id) or True)
    assert sweeper.sweep()["published"] == 1 and sent == [job_id]


def test_while_the_queue_has_a_backlog_due_jobs_wait_longer_but_expired_leases_do_not(world, monkeypatch):
    # a due job whose message is most likely still in a long queue is not duplicated...
    monkeypatch.setenv("SWEEP_REPUBLISH_AFTER_SECONDS", "120")  # the defaults: 2 min, 20 min in a backlog
    monkeypatch.delenv("SWEEP_BACKLOG_REPUBLISH_AFTER_SECONDS", raising=False)
    waiting = make_job(world.session(3210))
    five_min_ago = utcnow() - dt.timedelta(minutes=5)
    set_row(waiting, published_at=five_min_ago, next_attempt_at=five_min_ago)
    expired = make_job(world.session(3211))
    claim(expired)
    expire_lease(expired)
    set_row(expired, published_at=utcnow() - LONG_AGO)
    monkeypatch.setattr(sweeper, "queue_depth", lambda: 250)
    sent = []
    monkeypatch.setattr(ENQUEUE_MODULE, "publish", lambda job_id, kind, **_: sent.append(job_id) or True)
    assert sweeper.sweep() == {"found": 1, "published": 1, "queue_depth": 250} and sent == [expired]
    # ...until it has waited ten windows (20 min by default), or the queue has drained
    monkeypatch.setattr(sweeper, "queue_depth", lambda: 0)
    assert sweeper.sweep()["found"] == 1 and sent == [expired, waiting]


def test_a_due_job_that_was_never_given_a_message_is_taken_even_in_a_backlog(world, monkeypatch):
    # given a job waiting for an in-flight slot (no message: a release wakes it) whose
    # wake-up was lost, due 5 minutes ago, while the queue holds other tenants' messages
    monkeypatch.setenv("SWEEP_REPUBLISH_AFTER_SECONDS", "120")
    monkeypatch.delenv("SWEEP_BACKLOG_REPUBLISH_AFTER_SECONDS", raising=False)
    lost = make_job(world.session(3220))
    five_min_ago = utcnow() - dt.timedelta(minutes=5)
    set_row(lost, state="retrying", published_at=None, next_attempt_at=five_min_ago)
    just_due = make_job(world.session(3221))
    set_row(just_due, state="retrying", published_at=None, next_attempt_at=utcnow() - dt.timedelta(seconds=30))
    monkeypatch.setattr(sweeper, "queue_depth", lambda: 250)
    sent = []
    monkeypatch.setattr(ENQUEUE_MODULE, "publish", lambda job_id, kind, **_: sent.append(job_id) or True)
    # then the sweeper takes it after the normal wait, not the backlog's 20 minutes (the stuck
    # check would page for it first), and the one due 30 s ago not yet
    assert sweeper.sweep()["found"] == 1 and sent == [lost]


def test_queue_depth_counts_the_messages_waiting_in_the_broker():
    from tests import harness
    from tasks.enqueue import publish

    server = harness.RedisServer().start()
    try:
        with harness.publishing_to(server.url):
            assert sweeper.queue_depth() == 0
            for job_id in (1, 2, 3):
                assert publish(job_id, "resolve")
            assert sweeper.queue_depth() == 3
        server.kill()
        with harness.publishing_to(server.url):
            assert sweeper.queue_depth() is None
    finally:
        server.stop()


def test_broker_queue_lengths_count_every_priority_list_of_each_queue():
    # given messages at each fair-scheduling priority (kombu keeps a Redis list per step)
    from tests import harness
    from tasks.enqueue import FAIR_STEPS, FLOOD_PRIORITY, publish

    priorities = [pri for _, pri in FAIR_STEPS] + [FLOOD_PRIORITY]
    server = harness.RedisServer().start()
    try:
        with harness.publishing_to(server.url):
            for job_id, priority in enumerate(priorities, start=1):
                assert publish(job_id, "resolve", priority=priority)
            # then one read counts them all, and a queue never declared counts as empty
            assert sweeper.broker_queue_lengths("writeback", "drafting") == {"writeback": len(priorities),
                                                                             "drafting": 0}
            assert sweeper.queue_depth() == len(priorities)
        server.kill()
        # and a broker that is down raises (the sweeper and the metrics scrape decide what that means)
        with harness.publishing_to(server.url), pytest.raises(Exception):
            sweeper.broker_queue_lengths("writeback")
    finally:
        server.stop()


def test_broker_queue_lengths_count_under_the_deployments_redis_key_prefix():
    # given the suite's broker, whose keys carry CELERY_REDIS_KEY_PREFIX (as a shared Redis
    # would), and messages at three priorities in a queue no worker consumes
    import os

    import redis

    from worker.app import app

    assert app.conf.broker_transport_options.get("global_keyprefix")
    queue = f"depth-probe-{os.getpid()}"
    for priority in (0, 6, 9):
        app.send_task("writeback.resolve", kwargs={"job_id": 0}, queue=queue, priority=priority)
    try:
        # then all three are counted (a passive declare's existence check ignores the prefix)
        assert sweeper.broker_queue_lengths(queue, f"{queue}-unused") == {queue: 3, f"{queue}-unused": 0}
    finally:
        client = redis.Redis.from_url(app.conf.broker_url)
        prefix = app.conf.broker_transport_options["global_keyprefix"]
        client.delete(*client.keys(f"{prefix}{queue}*"), *client.keys(f"{prefix}_kombu.binding*.{queue}"))


def test_a_job_whose_message_was_lost_is_finished_by_a_worker_after_a_sweep(world, worker, monkeypatch):
    # given a job committed while the broker was unreachable (the publish after commit failed)
    sid = world.session(3209)
    monkeypatch.setattr(ENQUEUE_MODULE, "publish", lambda job_id, kind, **_: False)
    job_id = enqueue(None, JobKind.RESOLVE, session_id=sid, markdown="Replaced the battery.")
    monkeypatch.undo()
    lost(job_id)
    assert job(job_id).state == "queued"
    # when the sweeper runs (the queue is empty: nothing else is waiting)
    monkeypatch.setattr(sweeper, "queue_depth", lambda: 0)
    assert sweeper.sweep()["published"] == 1
    # then a worker finishes it
    j = wait_terminal(job_id)
    assert j.state == "succeeded" and len(world.sim.state.notes(3209)) == 1
