"""A task sent by name with the intent writes its job just before its claim
(tasks.intake.create_job via store.claim): what that must keep true."""
from __future__ import annotations

import functools
import types

import pytest
from celery import Celery
from sqlalchemy import event, func, select
from sqlalchemy.exc import OperationalError

from models import JobKind, WritebackJob, prepared
from models.db import ROUND_TRIP_OBSERVERS, get_engine, session_scope
from tasks import ConflictError, enqueue_resolve, intake, runner, store, writeback
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


# --- the by-name job's own writes (PostgreSQL: two round trips of their own, then the claim)

_VARYING = {"id", "idempotency_key", "session_id", "ticket_id", "ticket_key", "markdown", "created_at", "updated_at",
            "next_attempt_at", "published_at"}


def _columns(job_id: int) -> dict:
    with session_scope() as db:
        job = db.get(WritebackJob, job_id)
        return {c.key: getattr(job, c.key) for c in WritebackJob.__table__.columns}


def test_a_job_written_by_name_is_the_row_the_enqueue_api_writes(world):
    with session_scope() as db:  # what the enqueue API writes (enqueue.build_job), without publishing it
        by_api = intake.create_job(db.connection(), JobKind.RESOLVE, session_id=world.session(5401),
                                   markdown="Via the API.", idempotency_key="api-1")
    by_name = intake.create_job(None, JobKind.RESOLVE, session_id=world.session(5402), markdown="By name.",
                                idempotency_key="name-1")
    api, name = _columns(by_api), _columns(by_name)
    assert {k: v for k, v in name.items() if k not in _VARYING} == {k: v for k, v in api.items() if k not in _VARYING}
    assert name["state"] == "queued" and name["attempts"] == 0 and name["target_status_id"] is not None
    for column in ("created_at", "updated_at", "next_attempt_at", "published_at"):
        assert abs((name[column] - api[column]).total_seconds()) < 30, column
    assert name["ticket_key"] == f"{world.connection_id}:5402" and name["markdown"] == "By name."


def test_a_by_name_claim_is_three_round_trips_and_no_other_statement(world):
    sid = world.session(5403)
    trips: list[str] = []
    statements: list[str] = []

    def on_statement(conn, cursor, statement, *_):
        statements.append(statement)

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", on_statement)
    ROUND_TRIP_OBSERVERS.append(lambda sql, _: trips.append(sql))
    try:
        claimed = store.claim(None, "token-1", "task-1", "test@host", "resolve", create=functools.partial(
            intake.create_job, kind=JobKind.RESOLVE, session_id=sid, markdown="Note.", idempotency_key="celery:t1"))
    finally:
        ROUND_TRIP_OBSERVERS.pop()
        event.remove(engine, "before_cursor_execute", on_statement)
    assert isinstance(claimed, store.ClaimedJob) and claimed.session_id == sid and claimed.attempt_no == 1
    assert [t.split()[0] for t in trips] == ["SELECT", "INSERT", "SET"]  # facts, the row, the claim
    assert all(prepared._FORMS.get(sql) for sql in trips[:2])  # both prepared: PostgreSQL inferred every type
    assert statements == []
    # the same message again (a redelivery) finds its job: no second row
    again = intake.create_job(None, JobKind.RESOLVE, session_id=sid, markdown="Note.", idempotency_key="celery:t1")
    assert again == claimed.id


def _racing(monkeypatch, competitor):
    """Our plan() reads no job; then `competitor()` writes one (with _theirs, whose plan() is
    the real one) before our INSERT."""
    real = intake.plan

    def plan(*args, **kwargs):
        planned = real(*args, **kwargs)
        monkeypatch.setattr(intake, "plan", real)
        competitor()
        return planned

    monkeypatch.setattr(intake, "plan", plan)


def _theirs(session_id: int, markdown: str, key: str) -> int:
    """The enqueue API's write (enqueue.build_job) without its publish: no message for the
    suite's shared worker to run after this test, under a job id the next test reuses."""
    with session_scope() as db:
        return intake.create_job(db.connection(), JobKind.RESOLVE, session_id=session_id, markdown=markdown,
                                 idempotency_key=key)


def test_a_racing_job_with_the_same_key_and_intent_is_found_not_duplicated(world, monkeypatch):
    sid = world.session(5404)
    won: list[int] = []

    def competitor():
        won.append(_theirs(sid, "Note.", "same"))

    _racing(monkeypatch, competitor)
    assert intake.create_job(None, JobKind.RESOLVE, session_id=sid, markdown="Note.", idempotency_key="same") == won[0]
    with session_scope() as db:
        assert db.scalar(select(func.count()).select_from(WritebackJob)) == 1


@pytest.mark.parametrize("key, message", [
    ("same", "idempotency_key was already used for job"),  # the key, for another session
    ("mine", "already has a live resolve writeback"),  # another key, a live resolve of the same session
])
def test_a_racing_job_that_conflicts_is_refused_and_ours_is_not_written(world, monkeypatch, key, message):
    sid, other = world.session(5405), world.session(5406)

    def competitor():
        _theirs(other if key == "same" else sid, "Theirs.", "same")

    _racing(monkeypatch, competitor)
    with pytest.raises(ConflictError, match=message):
        intake.create_job(None, JobKind.RESOLVE, session_id=sid, markdown="Ours.", idempotency_key=key)
    with session_scope() as db:
        assert db.scalars(select(WritebackJob.markdown)).all() == ["Theirs."]


def test_an_outage_between_the_job_row_and_its_claim_retries_with_the_job_id(world, monkeypatch):
    """On PostgreSQL the by-name job is committed before its claim: when the claim then meets
    an outage, the retry names the job, and the markdown does not travel again."""
    sid = world.session(5407)
    real = store.round_trip

    def claim_fails(sql, params, prefix=""):
        if "pg_advisory_xact_lock" in prefix:  # the claim; the facts and the INSERT go through
            raise _outage()
        return real(sql, params, prefix)

    monkeypatch.setattr(store, "round_trip", claim_fails)
    monkeypatch.setattr(store, "DB_ATTEMPTS", 1)  # no waiting out the outage in a test
    task = _task()
    with pytest.raises(_Retry) as retried:
        writeback.run_job(task, JobKind.RESOLVE, (), None, {"session_id": sid, "markdown": "Secret-ish note."})
    written = _by_key("celery:task-1")
    assert written is not None and written.state == "queued" and written.attempts == 0  # the claim never landed
    assert retried.value.options["kwargs"] == {"job_id": written.id} and retried.value.options["args"] == ()
