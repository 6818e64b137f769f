"""Guarantees 5 and 6 in the runner (plain functions, real PostgreSQL and simulator, no
broker): what cannot succeed ends at once with a reason, and job_finished fires once per
job, however many executions it took."""
from __future__ import annotations

import time
from collections import defaultdict

import pytest
from sqlalchemy import update

from models import JobKind, PsaConnection, WritebackJob
from models.db import session_scope
from models import crypto
from tasks import events, runner, steps
from tests.factories import attempts, job
from tests.tasks.test_claim import claim, expire_lease, make_job


@pytest.fixture()
def fired():
    """job_finished / job_retry_scheduled payloads, per job id."""
    seen: dict[str, dict[int, list[dict]]] = {"job_finished": defaultdict(list),
                                              "job_retry_scheduled": defaultdict(list)}
    hooks = {name: (lambda name: lambda **p: seen[name][p["job_id"]].append(p))(name) for name in seen}
    for name, hook in hooks.items():
        events.subscribe(name, hook)
    yield seen
    for name, hook in hooks.items():
        events._subscribers[name].remove(hook)


def run_until_terminal(job_id: int, timeout: float = 20) -> runner.Outcome:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcome = runner.execute(job_id)
        if outcome.status not in ("retry", "skipped"):
            return outcome
        time.sleep(max(outcome.delay, 0.05))
    raise AssertionError(f"job {job_id} did not finish")


def test_an_unexpected_error_fails_the_job_at_once_with_its_reason(world, fired, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("board")

    monkeypatch.setattr(steps, "transition_and_verify", broken)
    job_id = make_job(world.session(3101))
    outcome = runner.execute(job_id)
    assert outcome.status == "failed"
    j = job(job_id)
    assert (j.state, j.attempts, j.error_type) == ("failed", 1, "KeyError")
    assert j.error_message == "internal error in the transition step: KeyError: 'board'"
    assert [a.outcome for a in attempts(job_id)] == ["failed"]
    assert [p["state"] for p in fired["job_finished"][job_id]] == ["failed"]


def test_a_job_that_keeps_losing_its_worker_ends_failed_instead_of_looping(world, fired):
    job_id = make_job(world.session(3102))
    with session_scope() as db:
        db.execute(update(WritebackJob).where(WritebackJob.id == job_id).values(max_attempts=2))
    for _ in range(2):  # two executions that die without an outcome (OOM, SIGKILL...)
        claim(job_id)
        expire_lease(job_id)
    outcome = runner.execute(job_id)
    assert outcome.status == "failed"
    j = job(job_id)
    assert j.state == "failed" and j.error_type == "WorkerLost"
    assert "gave up after 2 attempts: the last one ended without an outcome" in j.error_message
    assert [a.outcome for a in attempts(job_id)] == ["abandoned", "abandoned", "failed"]
    assert sum(world.sim.state.calls.values()) == 0
    assert len(fired["job_finished"][job_id]) == 1


def test_a_deactivated_connection_fails_without_a_psa_call_or_a_retry(world, fired):
    job_id = make_job(world.session(3103), JobKind.RESOLVE, markdown="x")
    with session_scope() as db:
        db.get(PsaConnection, world.connection_id).is_active = False
    outcome = runner.execute(job_id)
    j = job(job_id)
    assert outcome.status == "failed" and j.attempts == 1
    assert j.error_message == f"configuration error: PSA connection {world.connection_id} was deactivated after " \
                              "the job was enqueued"
    assert sum(world.sim.state.calls.values()) == 0
    assert len(fired["job_finished"][job_id]) == 1


def test_keys_that_no_longer_decrypt_fail_the_job_instead_of_storing_it_locally(world, fired, monkeypatch):
    job_id = make_job(world.session(3104), JobKind.RESOLVE, markdown="x")
    monkeypatch.setenv(crypto.ENV_VAR, crypto.generate_key())  # the old key was rotated away
    outcome = runner.execute(job_id)
    j = job(job_id)
    assert outcome.status == "failed" and j.error_type == "ConfigurationError"
    assert "cannot be decrypted" in j.error_message
    from tests.factories import session_row

    assert session_row(j.session_id).status == "open"  # not "resolved_local"
    assert sum(world.sim.state.calls.values()) == 0


def test_job_finished_fires_once_however_many_executions_and_duplicates(world, fired):
    world.sim.state.add_fault(action="error", status=503, operation="post_note", times=2)
    job_id = make_job(world.session(3105), JobKind.RESOLVE, markdown="Fixed it.")
    assert run_until_terminal(job_id).status == "succeeded"
    for _ in range(3):  # duplicate messages after the end
        assert runner.execute(job_id).result == {"refused": "terminal"}
    assert [p["state"] for p in fired["job_finished"][job_id]] == ["succeeded"]
    assert fired["job_finished"][job_id][0]["attempts"] == 3
    assert [p["attempt"] for p in fired["job_retry_scheduled"][job_id]] == [1, 2]


def test_exhausted_retries_fire_job_finished_once_with_the_failure(world, fired):
    world.sim.state.add_fault(action="error", status=503, operation="get_ticket", times=-1)
    sid = world.session(3106)
    with session_scope() as db:
        from tasks.enqueue import build_job

        job_id = build_job(db, JobKind.TRANSITION_STATUS, session_id=sid, status_id=9, max_attempts=3).id
    outcome = run_until_terminal(job_id)
    assert outcome.status == "failed" and "gave up after 3 attempts" in outcome.message
    assert [p["state"] for p in fired["job_finished"][job_id]] == ["failed"]
    assert len(fired["job_retry_scheduled"][job_id]) == 2
