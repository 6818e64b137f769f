"""Issue 2 behaviours end to end: real worker process, Redis, PostgreSQL, simulator over HTTP."""
from __future__ import annotations

from celery import Celery

from models.db import session_scope
from tasks import enqueue_resolve
from tests.factories import RESOLVED, session_row, wait_terminal


# Resolve, escalate, verification failure, already at target and transient retries run
# for every provider in tests/providers/contract/test_writeback.py.


def test_send_task_by_name_with_intent_reaches_terminal_state(world, worker):
    # The web tier does not import our code: it sends the documented name and JSON kwargs.
    sid = world.session(5006)
    client = Celery(broker=worker.env["CELERY_BROKER_URL"])
    client.conf.broker_transport_options = {"global_keyprefix": worker.env["CELERY_REDIS_KEY_PREFIX"]}
    client.send_task("writeback.resolve", kwargs={"session_id": sid, "markdown": "Sent by name."},
                     queue="writeback")
    from tests.harness import wait_for

    s = wait_for(lambda: (row := session_row(sid)).status == "resolved" and row, timeout=30, message="resolved")
    assert s.resolution_note_external_id is not None and s.psa_status_id == RESOLVED
    assert len(world.sim.state.notes(5006)) == 1


def test_jobs_enqueued_together_are_published_only_after_the_outer_commit(world, worker, monkeypatch):
    # Each enqueue uses a SAVEPOINT; releasing one must not publish the jobs before it.
    import importlib

    enq = importlib.import_module("tasks.enqueue")  # the package re-exports a function of that name
    from models import WritebackJob

    seen: list[tuple[int, bool]] = []
    real_publish = enq.publish

    def spy(job_id, kind, countdown=None, **options):
        with session_scope() as other:  # another connection: sees only committed rows
            seen.append((job_id, other.get(WritebackJob, job_id) is not None))
        return real_publish(job_id, kind, countdown, **options)

    monkeypatch.setattr(enq, "publish", spy)
    sids = [world.session(5100 + i) for i in range(3)]
    with session_scope() as db:
        ids = [enqueue_resolve(db, sid, f"Batch {sid}.") for sid in sids]
        assert seen == []  # nothing published inside the transaction
    assert sorted(seen) == [(i, True) for i in sorted(ids)]
    assert all(wait_terminal(i).state == "succeeded" for i in ids)
    # and a SAVEPOINT rolled back after some enqueues forgets only the job inside it
    seen.clear()
    later = [world.session(5110 + i) for i in range(3)]
    with session_scope() as db:
        first = enqueue_resolve(db, later[0], "Before the savepoint.")
        try:
            with db.begin_nested():
                enqueue_resolve(db, later[1], "Rolled back.")
                raise RuntimeError("the caller's step failed")
        except RuntimeError:
            pass
        last = enqueue_resolve(db, later[2], "After the savepoint.")
    assert sorted(seen) == [(first, True), (last, True)]
    assert wait_terminal(first).state == wait_terminal(last).state == "succeeded"
