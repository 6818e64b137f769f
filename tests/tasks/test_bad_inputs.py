"""Guarantee 5: bad input never causes a retry storm, and never leaves a half-written row.

Two tables. The enqueue API (what the web tier calls in-process): each bad input raises a
RequestError subclass whose message names the problem, writes nothing, and leaves the
caller's own transaction usable. Task payloads sent by name (what a web tier that does not
import us sends): each ends the Celery task at once in FAILURE with that message, as
Flower sees it through the task events, is never retried, and writes nothing."""
from __future__ import annotations

import uuid
from typing import Any, Callable

import pytest
from celery import Celery
from sqlalchemy import func, select

from models import AiSession, PsaConnection, WritebackAttempt, WritebackJob
from models.db import session_scope
from tasks import ConflictError, NotFoundError, RequestError, admin, enqueue
from tests.factories import World
from tests.harness import wait_for

BIG = "x" * 60_001


def _counts() -> tuple[int, int]:
    # Jobs and sessions: what an enqueue writes. Attempt rows are the worker's (the suite's
    # worker may claim an earlier, valid job of the same test at any moment), and none can
    # exist without a job row.
    with session_scope() as db:
        return tuple(db.scalar(select(func.count()).select_from(t)) for t in (WritebackJob, AiSession))


class Ctx:
    """What a row needs: a linked session, and ids of things that are wrong for it."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.sid = world.session(4001)
        st = world.sim.state
        with session_scope() as db:
            self.foreign_conn = admin.add_connection(
                db, account_id=2, provider="connectwise", base_url=world.sim.base_url, company_id=st.company_id,
                client_id=st.client_id, public_key="p", private_key="q").id
            inactive = admin.add_connection(
                db, account_id=world.account_id, provider="connectwise", base_url=world.sim.base_url,
                company_id=st.company_id, client_id=st.client_id, public_key="p", private_key="q")
            inactive.is_active = False
            self.inactive_conn = inactive.id
            self.unlinked_sid = admin.create_session(db, account_id=world.account_id, title="no PSA").id
            self.no_ticket_sid = admin.create_session(db, account_id=world.account_id,
                                                      psa_connection_id=world.connection_id, title="no ticket").id


# (id, kind, intent (built from the context), error type, message fragment, field)
Row = tuple[str, str, Callable[[Ctx], dict[str, Any]], type, str, str | None]
ENQUEUE_ROWS: list[Row] = [
    ("session-id-text", "resolve", lambda c: {"session_id": "abc", "markdown": "x"}, RequestError,
     "session_id must be a positive integer, got str 'abc'", "session_id"),
    ("session-id-negative", "resolve", lambda c: {"session_id": -1, "markdown": "x"}, RequestError,
     "session_id must be a positive integer, got -1", "session_id"),
    ("session-id-zero", "resolve", lambda c: {"session_id": 0, "markdown": "x"}, RequestError,
     "must be a positive integer, got 0", "session_id"),
    ("session-id-float", "resolve", lambda c: {"session_id": 1.5, "markdown": "x"}, RequestError,
     "got float 1.5", "session_id"),
    ("session-id-bool", "resolve", lambda c: {"session_id": True, "markdown": "x"}, RequestError,
     "got bool True", "session_id"),
    ("session-id-none", "resolve", lambda c: {"session_id": None, "markdown": "x"}, RequestError,
     "got NoneType None", "session_id"),
    ("session-id-list", "resolve", lambda c: {"session_id": [c.sid], "markdown": "x"}, RequestError,
     "got list", "session_id"),
    ("session-id-huge", "resolve", lambda c: {"session_id": 2**64, "markdown": "x"}, RequestError,
     "session_id is out of range", "session_id"),
    ("session-unknown", "resolve", lambda c: {"session_id": 999_999, "markdown": "x"}, NotFoundError,
     "unknown session 999999", "session_id"),
    ("markdown-none", "resolve", lambda c: {"session_id": c.sid, "markdown": None}, RequestError,
     "markdown must be a string, got NoneType", "markdown"),
    ("markdown-int", "escalate", lambda c: {"session_id": c.sid, "markdown": 42}, RequestError,
     "markdown must be a string, got int 42", "markdown"),
    ("markdown-dict", "escalate", lambda c: {"session_id": c.sid, "markdown": {"text": "x"}}, RequestError,
     "markdown must be a string, got dict", "markdown"),
    ("markdown-empty", "resolve", lambda c: {"session_id": c.sid, "markdown": ""}, RequestError,
     "markdown is empty", "markdown"),
    ("markdown-blank", "resolve", lambda c: {"session_id": c.sid, "markdown": " \n\t "}, RequestError,
     "markdown is empty", "markdown"),
    ("markdown-huge", "resolve", lambda c: {"session_id": c.sid, "markdown": BIG}, RequestError,
     "markdown is 60001 characters; the limit is 60000", "markdown"),
    ("markdown-nul", "resolve", lambda c: {"session_id": c.sid, "markdown": "fixed\x00it"}, RequestError,
     "control character (U+0000) at position 5", "markdown"),
    ("markdown-escape", "resolve", lambda c: {"session_id": c.sid, "markdown": "\x1b[31mred"}, RequestError,
     "control character (U+001B)", "markdown"),
    ("markdown-c1", "escalate", lambda c: {"session_id": c.sid, "markdown": "next\x85line"}, RequestError,
     "control character (U+0085)", "markdown"),
    ("markdown-not-utf8", "resolve", lambda c: {"session_id": c.sid, "markdown": b"caf\xe9"}, RequestError,
     "markdown is not valid UTF-8", "markdown"),
    ("markdown-lone-surrogate", "resolve", lambda c: {"session_id": c.sid, "markdown": "half \ud83d emoji"},
     RequestError, "not valid UTF-8 (lone surrogate", "markdown"),
    ("visibility-unknown", "post_note", lambda c: {"session_id": c.sid, "markdown": "x", "visibility": "public"},
     RequestError, "visibility must be one of resolution, internal, discussion, got str 'public'", "visibility"),
    ("visibility-none", "post_note", lambda c: {"session_id": c.sid, "markdown": "x", "visibility": None},
     RequestError, "visibility must be one of", "visibility"),
    ("status-negative", "transition_status", lambda c: {"session_id": c.sid, "status_id": -5}, RequestError,
     "status_id must be a positive integer, got -5", "status_id"),
    ("status-zero", "transition_status", lambda c: {"session_id": c.sid, "status_id": 0}, RequestError,
     "status_id must be a positive integer, got 0", "status_id"),
    ("status-text", "transition_status", lambda c: {"session_id": c.sid, "status_id": "Resolved"}, RequestError,
     "status_id must be a positive integer, got str 'Resolved'", "status_id"),
    ("status-huge", "transition_status", lambda c: {"session_id": c.sid, "status_id": 2**70}, RequestError,
     "status_id is out of range", "status_id"),
    ("status-on-resolve", "resolve", lambda c: {"session_id": c.sid, "markdown": "x", "status_id": 9}, RequestError,
     "takes its target status from the account's preferences", "status_id"),
    ("markdown-on-transition", "transition_status", lambda c: {"session_id": c.sid, "status_id": 9,
                                                                "markdown": "x"},
     RequestError, "transition_status takes no markdown or visibility", None),
    ("connection-of-another-account", "resolve",
     lambda c: {"session_id": c.sid, "markdown": "x", "psa_connection_id": c.foreign_conn}, RequestError,
     "belongs to another account", "psa_connection_id"),
    ("connection-unknown", "resolve", lambda c: {"session_id": c.sid, "markdown": "x", "psa_connection_id": 777},
     NotFoundError, "unknown PSA connection 777", "psa_connection_id"),
    ("connection-inactive", "resolve",
     lambda c: {"session_id": c.sid, "markdown": "x", "psa_connection_id": c.inactive_conn}, RequestError,
     "is inactive", "psa_connection_id"),
    ("connection-id-negative", "resolve", lambda c: {"session_id": c.sid, "markdown": "x", "psa_connection_id": -2},
     RequestError, "psa_connection_id must be a positive integer", "psa_connection_id"),
    ("no-psa-for-post-note", "post_note",
     lambda c: {"session_id": c.unlinked_sid, "markdown": "x", "visibility": "internal"}, RequestError,
     "has no PSA linked", "session_id"),
    ("linked-without-ticket", "resolve", lambda c: {"session_id": c.no_ticket_sid, "markdown": "x"}, RequestError,
     "is linked to a PSA but has no ticket id", "session_id"),
    ("idempotency-key-empty", "resolve", lambda c: {"session_id": c.sid, "markdown": "x", "idempotency_key": ""},
     RequestError, "idempotency_key must be a non-empty printable string", "idempotency_key"),
    ("idempotency-key-control", "resolve",
     lambda c: {"session_id": c.sid, "markdown": "x", "idempotency_key": "req\x07"}, RequestError,
     "idempotency_key must be a non-empty printable string", "idempotency_key"),
    ("idempotency-key-long", "resolve",
     lambda c: {"session_id": c.sid, "markdown": "x", "idempotency_key": "k" * 256}, RequestError,
     "longer than 255 characters", "idempotency_key"),
    ("max-attempts-zero", "resolve", lambda c: {"session_id": c.sid, "markdown": "x", "max_attempts": 0},
     RequestError, "max_attempts must be a positive integer, got 0", "max_attempts"),
    ("kind-unknown", "delete_ticket", lambda c: {"session_id": c.sid}, RequestError,
     "kind must be one of resolve, escalate, post_note, transition_status", "kind"),
]


@pytest.fixture(scope="module")
def table_ctx():
    """One world for the whole table (rows write nothing, so they cannot disturb each
    other); a per-row world would spend most of the time starting simulators."""
    from providers.simulators.connectwise import SimulatorServer
    from tests import harness
    from models.db import get_engine

    harness.truncate_all(get_engine())
    server = SimulatorServer().start()
    try:
        yield Ctx(World.create(server))
    finally:
        server.stop()


@pytest.mark.parametrize("in_callers_transaction", [False, True], ids=["own-transaction", "callers-transaction"])
@pytest.mark.parametrize("row", ENQUEUE_ROWS, ids=[r[0] for r in ENQUEUE_ROWS])
def test_enqueue_refuses_bad_input_clearly_and_writes_nothing(table_ctx, row: Row, in_callers_transaction: bool):
    _, kind, intent, error, fragment, field = row
    ctx, world = table_ctx, table_ctx.world
    before = _counts()
    if in_callers_transaction:
        # the web tier catches our error and carries on with its own transaction
        with session_scope() as db:
            db.get(AiSession, ctx.sid).title = "edited in the same request"
            with pytest.raises(error) as caught:
                enqueue(db, kind, **intent(ctx))
        with session_scope() as db:
            assert db.get(AiSession, ctx.sid).title == "edited in the same request"
    else:
        with pytest.raises(error) as caught:
            enqueue(None, kind, **intent(ctx))
    assert fragment in caught.value.message
    assert caught.value.field == field
    assert caught.value.as_dict()["error"] in ("invalid_request", "not_found", "conflict")
    assert _counts() == before  # nothing half-written
    assert sum(world.sim.state.calls.values()) == 0


def test_the_enqueue_table_is_at_least_thirty_rows():
    assert len(ENQUEUE_ROWS) >= 30 and len({r[0] for r in ENQUEUE_ROWS}) == len(ENQUEUE_ROWS)


def test_a_conflicting_idempotency_key_is_refused_and_writes_nothing(world):
    ctx = Ctx(world)
    other = world.session(4002)
    first = enqueue(None, "resolve", session_id=ctx.sid, markdown="first", idempotency_key="req-1")
    before = _counts()
    with pytest.raises(ConflictError, match=f"idempotency_key was already used for job {first} "):
        enqueue(None, "resolve", session_id=other, markdown="second", idempotency_key="req-1")
    assert _counts() == before


# --- task payloads sent by name -------------------------------------------------------

# (id, task, args, kwargs (built from the context), exception type, message fragment)
TaskRow = tuple[str, str, Callable[[Ctx], list[Any]], Callable[[Ctx], dict[str, Any]], str, str]
TASK_ROWS: list[TaskRow] = [
    ("no-arguments", "writeback.resolve", lambda c: [], lambda c: {}, "InvalidTaskArguments",
     "missing required argument(s): markdown, session_id"),
    ("missing-markdown", "writeback.resolve", lambda c: [], lambda c: {"session_id": c.sid}, "InvalidTaskArguments",
     "missing required argument(s): markdown"),
    ("missing-visibility", "writeback.post_note", lambda c: [], lambda c: {"session_id": c.sid, "markdown": "x"},
     "InvalidTaskArguments", "missing required argument(s): visibility"),
    ("unknown-field", "writeback.resolve", lambda c: [],
     lambda c: {"session_id": c.sid, "markdown": "x", "colour": "red"}, "InvalidTaskArguments",
     "unknown argument(s): colour"),
    ("session-id-text", "writeback.escalate", lambda c: [], lambda c: {"session_id": "abc", "markdown": "x"},
     "InvalidTaskArguments", "session_id must be a positive integer"),
    ("markdown-number", "writeback.resolve", lambda c: [], lambda c: {"session_id": c.sid, "markdown": 3.5},
     "InvalidTaskArguments", "markdown must be a string, got float 3.5"),
    ("markdown-lone-surrogate", "writeback.resolve", lambda c: [],
     lambda c: {"session_id": c.sid, "markdown": "bad \udc80 byte"}, "InvalidTaskArguments", "not valid UTF-8"),
    ("markdown-control", "writeback.resolve", lambda c: [], lambda c: {"session_id": c.sid, "markdown": "a\x07b"},
     "InvalidTaskArguments", "control character (U+0007)"),
    ("markdown-huge", "writeback.escalate", lambda c: [], lambda c: {"session_id": c.sid, "markdown": BIG},
     "InvalidTaskArguments", "the limit is 60000"),
    ("status-negative", "writeback.transition_status", lambda c: [], lambda c: {"session_id": c.sid, "status_id": -9},
     "InvalidTaskArguments", "status_id must be a positive integer, got -9"),
    ("foreign-connection", "writeback.resolve", lambda c: [],
     lambda c: {"session_id": c.sid, "markdown": "x", "psa_connection_id": c.foreign_conn}, "InvalidTaskArguments",
     "belongs to another account"),
    ("unknown-session", "writeback.resolve", lambda c: [], lambda c: {"session_id": 424242, "markdown": "x"},
     "InvalidTaskArguments", "unknown session 424242"),
    ("job-id-text", "writeback.resolve", lambda c: [], lambda c: {"job_id": "seven"}, "InvalidTaskArguments",
     "job_id must be a positive integer, got str 'seven'"),
    ("job-id-negative", "writeback.resolve", lambda c: [], lambda c: {"job_id": -3}, "InvalidTaskArguments",
     "job_id must be a positive integer, got -3"),
    ("job-id-and-intent", "writeback.resolve", lambda c: [], lambda c: {"job_id": 5, "markdown": "x"},
     "InvalidTaskArguments", "pass either job_id or the intent, not both"),
    ("extra-positional", "writeback.resolve", lambda c: [1, 2], lambda c: {}, "InvalidTaskArguments",
     "got 2 positional argument(s)"),
    ("vanished-job", "writeback.resolve", lambda c: [], lambda c: {"job_id": 987654}, "PoisonMessage",
     "job 987654 does not exist"),
]


def _client(worker) -> Celery:
    client = Celery(broker=worker.env["CELERY_BROKER_URL"])
    client.conf.broker_transport_options = {"global_keyprefix": worker.env["CELERY_REDIS_KEY_PREFIX"]}
    return client


def test_bad_task_payloads_fail_at_once_with_a_clear_reason_and_write_nothing(world, worker, task_events):
    ctx = Ctx(world)
    client = _client(worker)
    before = _counts()
    sent = {}
    for name, task, args, kwargs, _, _ in TASK_ROWS:
        task_id = f"bad-{name}-{uuid.uuid4().hex[:6]}"
        client.send_task(task, args=args(ctx), kwargs=kwargs(ctx), queue="writeback", task_id=task_id)
        sent[name] = task_id
    for name, _, _, _, exc_type, fragment in TASK_ROWS:
        [failed] = wait_for(lambda: task_events.of(sent[name], "task-failed"), timeout=30,
                            message=f"task-failed for {name}")
        assert failed["exception"].startswith(exc_type), (name, failed["exception"])
        assert fragment in failed["exception"], (name, failed["exception"])
    for name, task_id in sent.items():  # once: acked, never retried, never redelivered
        assert task_events.of(task_id, "task-retried") == [], name
        assert len(task_events.of(task_id, "task-received")) == 1, name
    assert _counts() == before
    assert sum(world.sim.state.calls.values()) == 0


def test_a_message_for_a_job_of_another_kind_fails_and_leaves_the_job_alone(world, worker, task_events):
    ctx = Ctx(world)
    with session_scope() as db:  # a resolve job, written without publishing it
        from tasks.enqueue import build_job
        from models import JobKind

        job_id = build_job(db, JobKind.RESOLVE, session_id=ctx.sid, markdown="x").id
    task_id = f"wrong-kind-{uuid.uuid4().hex[:6]}"
    _client(worker).send_task("writeback.transition_status", kwargs={"job_id": job_id}, queue="writeback",
                              task_id=task_id)
    [failed] = wait_for(lambda: task_events.of(task_id, "task-failed"), timeout=30, message="task-failed")
    assert failed["exception"].startswith("PoisonMessage")
    assert f"job {job_id}: job is a resolve job; send it to writeback.resolve" in failed["exception"]
    with session_scope() as db:
        j = db.get(WritebackJob, job_id)
        assert (j.state, j.attempts) == ("queued", 0)
        assert db.scalar(select(func.count()).select_from(WritebackAttempt)) == 0


def test_an_undecodable_message_is_dropped_and_the_worker_keeps_working(world, worker, task_events):
    # a body that is not JSON at all: Celery cannot even read the task name's arguments
    import kombu

    ctx = Ctx(world)
    client = _client(worker)
    garbage_id = f"garbage-{uuid.uuid4().hex[:8]}"
    with client.connection_for_write() as conn:
        producer = kombu.Producer(conn)
        producer.publish(b"\xff\xfe not json", routing_key="writeback", exchange="writeback",
                         content_type="application/json", content_encoding="binary",
                         headers={"task": "writeback.resolve", "id": garbage_id, "lang": "py", "argsrepr": "",
                                  "kwargsrepr": ""}, declare=[kombu.Queue("writeback")])
    def reports() -> list[str]:
        return [line for line in worker.log_text().splitlines()
                if "Can't decode message body" in line and garbage_id in line]

    wait_for(reports, timeout=30, message="the worker to report the message it could not decode")
    # the worker is still consuming: a good job sent after it completes
    from tests.factories import wait_terminal

    assert wait_terminal(enqueue(None, "resolve", session_id=ctx.sid, markdown="Still here.")).state == "succeeded"
    assert worker.proc.poll() is None
    assert len(reports()) == 1  # dropped, not redelivered in a loop
