"""One account cannot reach another's connections, sessions, jobs or idempotency keys, and
an error never names another account's ids. Enqueue API in-process and the by-name tasks
through a real worker, on real PostgreSQL."""
from __future__ import annotations

import uuid

import pytest
from celery import Celery
from sqlalchemy import func, select

from models import AiSession, WritebackJob
from models.db import session_scope
from tasks import ConflictError, NotFoundError, RequestError, admin, enqueue_resolve
from tests.factories import World, wait_terminal
from tests.harness import wait_for


def _counts() -> tuple[int, int]:
    with session_scope() as db:
        return db.scalar(select(func.count()).select_from(WritebackJob)), \
            db.scalar(select(func.count()).select_from(AiSession))


@pytest.fixture()
def two_tenants(world):
    """Account 1 (world) and account 2, each with a connection to the simulator."""
    other = World.create(world.sim, account_id=2)
    return world, other


def test_create_session_refuses_a_connection_of_another_account(two_tenants):
    a, b = two_tenants
    before = _counts()
    with pytest.raises(RequestError, match=f"PSA connection {b.connection_id} belongs to another account") as err:
        with session_scope() as db:
            admin.create_session(db, account_id=a.account_id, psa_connection_id=b.connection_id, psa_ticket_id=5)
    assert err.value.field == "psa_connection_id"
    assert _counts() == before


def test_idempotency_keys_are_scoped_per_account(two_tenants, worker):
    a, b = two_tenants
    first = enqueue_resolve(None, a.session(7101), "Account 1's note.", idempotency_key="order-1")
    # Another account reusing the same key gets its own job, not a conflict naming account 1's
    second = enqueue_resolve(None, b.session(7102), "Account 2's note.", idempotency_key="order-1")
    assert second != first
    # the same account repeating the same intent gets its own job back
    assert enqueue_resolve(None, _session_of(second), "Account 2's note.",
                           idempotency_key="order-1") == second
    # and a conflict within account 2 names only account 2's job and session
    with pytest.raises(ConflictError) as err:
        enqueue_resolve(None, b.session(7103), "Another note.", idempotency_key="order-1")
    message = err.value.message
    assert f"job {second}" in message and f"session {_session_of(second)}" in message
    assert f"job {first} " not in message and f"session {_session_of(first)}" not in message
    assert wait_terminal(first).state == wait_terminal(second).state == "succeeded"


def _session_of(job_id: int) -> int:
    with session_scope() as db:
        return db.get(WritebackJob, job_id).session_id


def test_the_enqueue_api_refuses_another_accounts_session_when_given_account_id(two_tenants, worker):
    a, b = two_tenants
    sid = a.session(7201)
    before = _counts()
    with pytest.raises(NotFoundError, match=f"unknown session {sid} for account 2") as err:
        enqueue_resolve(None, sid, "Not yours.", account_id=b.account_id)
    assert err.value.field == "session_id"
    # the same words for a session that does not exist at all: nothing to learn
    with pytest.raises(NotFoundError, match="unknown session 999999 for account 2"):
        enqueue_resolve(None, 999999, "Not yours.", account_id=b.account_id)
    with pytest.raises(RequestError, match="account_id must be a positive integer"):
        enqueue_resolve(None, sid, "x", account_id="two")
    assert _counts() == before
    job_id = enqueue_resolve(None, sid, "Mine.", account_id=a.account_id)  # the right account: accepted
    assert wait_terminal(job_id).state == "succeeded"


def _client(worker) -> Celery:
    client = Celery(broker=worker.env["CELERY_BROKER_URL"])
    client.conf.broker_transport_options = {"global_keyprefix": worker.env["CELERY_REDIS_KEY_PREFIX"]}
    return client


def test_the_by_name_tasks_refuse_another_accounts_session_or_job(two_tenants, worker, task_events):
    a, b = two_tenants
    client = _client(worker)
    sid = a.session(7301)
    with session_scope() as db:  # a job of account 1, written without publishing it
        from models import JobKind
        from tasks.enqueue import build_job

        job_id = build_job(db, JobKind.RESOLVE, session_id=a.session(7302), markdown="x").id
    before = _counts()
    sent = {}
    for name, kwargs in (("session", {"session_id": sid, "markdown": "Not yours.", "account_id": b.account_id}),
                         ("job", {"job_id": job_id, "account_id": b.account_id})):
        sent[name] = f"foreign-{name}-{uuid.uuid4().hex[:6]}"
        client.send_task("writeback.resolve", kwargs=kwargs, queue="writeback", task_id=sent[name])
    failures = {name: wait_for(lambda: task_events.of(tid, "task-failed"), timeout=30, message=name)[0]["exception"]
                for name, tid in sent.items()}
    assert failures["session"].startswith("InvalidTaskArguments")
    assert f"unknown session {sid} for account 2" in failures["session"]
    assert failures["job"].startswith("InvalidTaskArguments")
    assert f"job {job_id} is not a job of account 2" in failures["job"]
    assert _counts() == before
    with session_scope() as db:
        assert db.get(WritebackJob, job_id).attempts == 0  # never claimed
    # with its own account the same message runs
    own = f"own-{uuid.uuid4().hex[:6]}"
    client.send_task("writeback.resolve", kwargs={"session_id": sid, "markdown": "Mine.", "account_id": 1},
                     queue="writeback", task_id=own)
    wait_for(lambda: task_events.of(own, "task-succeeded"), timeout=30, message="own-account task to succeed")
    assert sum(a.sim.state.calls.values()) > 0
