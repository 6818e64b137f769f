"""A task sent by name with the intent writes its job in the claim's own transaction
(tasks.intake.create_job via store.claim): what that must keep true."""
from __future__ import annotations

import types

import pytest
from celery import Celery
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from models import JobKind, WritebackJob
from models.db import session_scope
from tasks import enqueue_resolve, runner, writeback
from tests.factories import session_row, wait_terminal
from tests.harness import wait_for


class _Retry(Exception):
    def __init__(self, **options):
        super().__init__("retry")
        self.options = options


def _task() -> types.SimpleNamespace:
    def retry(**options):
        return _Retry(**options)
    return types.SimpleNamespace(name="writeback.resolve", retry=retry,
                                 request=types.SimpleNamespace(id="task-1", hostname="test@host"))


def _outage() -> OperationalError:
    return OperationalError("UPDATE writeback_jobs ...", {}, Exception("server closed the connection"))


def test_a_database_outage_after_the_claim_retries_with_the_job_id_not_the_markdown(monkeypatch):
    def execute(job_id, *_, create=None, on_claim=None, **__):
        assert job_id is None and create is not None  # the intent's job is written by the claim
        on_claim(41)  # the claim's transaction committed job 41
        raise _outage()  # ...then a later write of the job met the outage

    monkeypatch.setattr(runner, "execute", execute)
    with pytest.raises(_Retry) as retried:
        writeback.run_job(_task(), JobKind.RESOLVE, (), None, {"session_id": 7, "markdown": "Secret-ish note."})
    assert retried.value.options["kwargs"] == {"job_id": 41} and retried.value.options["args"] == ()


def test_a_database_outage_before_the_claim_committed_retries_the_intent(monkeypatch):
    def execute(*_, **__):
        raise _outage()  # the claim (and the job row with it) rolled back: no job to name

    monkeypatch.setattr(runner, "execute", execute)
    with pytest.raises(_Retry) as retried:
        writeback.run_job(_task(), JobKind.RESOLVE, (), None, {"session_id": 7, "markdown": "Note."})
    assert "kwargs" not in retried.value.options  # the same message again: its task id keys the job


def test_a_job_sent_by_name_behind_a_running_job_of_its_ticket_is_kept_and_runs_after_it(world, worker):
    sid = world.session(5301)
    # the first job's first call (its look at the ticket's notes) takes a while
    world.sim.state.add_fault(action="delay", operation="list_notes", seconds=2, ticket_id=5301)
    with session_scope() as db:
        first = enqueue_resolve(db, sid, "First, via the API.")
    wait_for(lambda: _job(first).state == "running", timeout=15, message="first job running")
    client = Celery(broker=worker.env["CELERY_BROKER_URL"])
    client.conf.broker_transport_options = {"global_keyprefix": worker.env["CELERY_REDIS_KEY_PREFIX"]}
    sent = client.send_task("writeback.post_note", kwargs={"session_id": sid, "markdown": "Second, by name.",
                                                            "visibility": "internal"}, queue="writeback")
    # the by-name job's row is written (and kept) although its claim is refused while the first runs
    second = wait_for(lambda: _by_key(f"celery:{sent.id}"), timeout=15, message="by-name job written")
    assert wait_terminal(first).state == "succeeded"
    assert wait_terminal(second.id).state == "succeeded"
    done = _job(second.id)
    assert done.started_at >= _job(first).finished_at  # one job of a ticket at a time, in id order
    notes = [n["text"] for n in world.sim.state.notes(5301)]
    assert len(notes) == 2 and sum("Second, by name." in n for n in notes) == 1
    assert session_row(sid).status == "resolved"


def _job(job_id: int) -> WritebackJob:
    with session_scope() as db:
        return db.get(WritebackJob, job_id)


def _by_key(key: str) -> WritebackJob | None:
    with session_scope() as db:
        return db.scalar(select(WritebackJob).where(WritebackJob.idempotency_key == key))
