"""Alerts end to end: a real worker, PostgreSQL, the ConnectWise simulator, and a real HTTP
webhook receiver on loopback. Each alert must reach the log, the database and the webhook
exactly once per job and kind (once per connection for dead credentials)."""
from __future__ import annotations

import datetime as dt
import re

import pytest
from sqlalchemy import select, update

import celeryconfig
from models import Alert, AlertKind, JobKind, PsaConnection, WritebackJob, crypto, utcnow
from models.db import session_scope
from tasks import admin, repair
from tasks.enqueue import TASK_NAMES, build_job
from tests.factories import RESOLVED, job, wait_terminal
from tests.harness import wait_for
from tests.ops.conftest import Receiver, start_worker, submit


@pytest.fixture(scope="module")
def receiver():
    server = Receiver()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def alert_worker(ops_broker, receiver, tmp_path_factory):
    proc = start_worker(ops_broker, tmp_path_factory.mktemp("alerts"), ALERT_WEBHOOK_URL=receiver.url,
                        ALERT_WEBHOOK_RETRY_SECONDS="0.2", ALERT_WEBHOOK_MAX_DELAY_SECONDS="0.5",
                        ALERT_WEBHOOK_MAX_ATTEMPTS="3", ALERT_WEBHOOK_TIMEOUT_SECONDS="1", STUCK_AFTER_SECONDS="30")
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def _fresh_receiver(receiver):
    receiver.reset()


def alerts(**where) -> list[Alert]:
    with session_scope() as db:
        q = select(Alert).order_by(Alert.id)
        for key, value in where.items():
            q = q.where(getattr(Alert, key) == value)
        return list(db.scalars(q))


def publisher(client):
    def publish(job_id: int, kind: str) -> bool:
        client.send_task(TASK_NAMES[JobKind(kind)], kwargs={"job_id": job_id}, queue="writeback")
        return True
    return publish


def delivered(alert_id: int, state: str = "sent") -> Alert:
    return wait_for(lambda: (a := alerts(id=alert_id)[0]).delivery_state == state and a, timeout=15,
                    message=f"alert {alert_id} delivery {state}")


def test_verification_failure_alerts_once_in_log_database_and_webhook(world, alert_worker, receiver, ops_client):
    start = alert_worker.mark()  # this test's log lines only
    # given a ticket whose board silently undoes status changes, on a named account
    with session_scope() as db:
        admin.ensure_account(db, world.account_id).name = "Acme MSP"
    sid = world.session(48213, reject_status_changes=True)
    # when the resolve runs
    job_id = submit(ops_client, "resolve", sid, "Replaced the fuser unit.")
    assert wait_terminal(job_id).state == "verification_failed"
    # then one alert row with the job, the ticket, and the expected and observed status
    [alert] = wait_for(lambda: alerts(job_id=job_id), message="alert row")
    assert (alert.kind, alert.ticket_id, alert.account_id) == ("verification_failed", 48213, world.account_id)
    assert (alert.expected_status_id, alert.expected_status_name) == (RESOLVED, "Resolved")
    assert (alert.observed_status_id, alert.observed_status_name) == (1, "New")
    # and one Slack-compatible webhook naming account, ticket, expected, observed and job
    delivered(alert.id)
    [body] = receiver.bodies()
    # (the tenant's strings, account and status names, as code spans: never markup)
    for part in ("`Acme MSP` (1)", "connectwise #48213", "expected 9 (`Resolved`)", "observed 1 (`New`)",
                 f"job {job_id}"):
        assert part in body["text"], (part, body["text"])
    fields = [f["text"] for b in body["blocks"] if b["type"] == "section" for f in b.get("fields", [])]
    assert "*Expected status*\n9 (`Resolved`)" in fields and "*Observed status*\n1 (`New`)" in fields
    assert "Replaced the fuser" not in str(body)  # the note itself is never in an alert
    # and one structured ERROR line
    lines = [ln for ln in alert_worker.log_text(start).splitlines() if "ALERT verification_failed" in ln]
    assert len(lines) == 1 and "ERROR" in lines[0] and f"job_id={job_id}" in lines[0] and "ticket_id=48213" in lines[0]

    # when the message is redelivered and another thread (or the reconciler) raises it again
    for _ in range(2):
        ops_client.send_task("writeback.resolve", kwargs={"job_id": job_id}, queue="writeback")
    from worker.alerts import raise_for_job, run_checks

    assert raise_for_job(AlertKind.VERIFICATION_FAILED, job_id) is None
    assert run_checks()["reconciled"] == 0
    wait_for(lambda: alert_worker.log_text(start).count("job already verification_failed") >= 2, message="redeliveries")
    # then there is still exactly one alert and one webhook
    assert len(alerts(job_id=job_id)) == 1 and len(receiver.bodies()) == 1


def test_job_failing_after_its_retries_alerts_once_however_often_it_is_retried(world, alert_worker, receiver,
                                                                                ops_client):
    start = alert_worker.mark()
    sid = world.session(6101)
    world.sim.state.add_fault(action="error", status=503, operation="post_note", times=-1)
    job_id = submit(ops_client, "resolve", sid, "Cleared the print spooler.", max_attempts=2)
    j = wait_terminal(job_id)
    assert (j.state, j.attempts) == ("failed", 2)
    [alert] = wait_for(lambda: alerts(job_id=job_id), message="alert row")
    assert alert.kind == "job_failed" and "gave up after 2 attempts" in alert.message
    # and the job's outcome line carries the reason (the runner does not log it a second time)
    wait_for(lambda: any(f"job {job_id} failed (failed) after 2 attempt(s): gave up after 2 attempts" in ln
                         and "WARNING" in ln for ln in alert_worker.log_text(start).splitlines()), message="outcome line")
    assert alert.expected_status_id == RESOLVED and alert.observed_status_id is None
    delivered(alert.id)
    assert "Writeback failed" in receiver.bodies()[0]["text"]
    # when an operator retries it and it fails again
    assert repair.retry(job_id, actor="test", budget=1, publish=publisher(ops_client)).ok
    wait_for(lambda: (x := job(job_id)).state == "failed" and x.attempts == 3, message="second failure")
    # then it is still one alert, one page
    assert [a.kind for a in alerts(job_id=job_id)] == ["job_failed"]
    assert len(receiver.bodies()) == 1


def test_dead_credentials_page_once_per_connection_and_close_when_they_work_again(world, alert_worker, receiver,
                                                                                   ops_client):
    # given a connection whose private key was revoked at the PSA
    st = world.sim.state
    with session_scope() as db:
        bad = admin.add_connection(db, account_id=world.account_id, provider="connectwise", base_url=world.sim.base_url,
                                   company_id=st.company_id,
                                   client_id=st.client_id, public_key=st.public_key, private_key="revoked-key")
        bad_id = bad.id
        sessions = []
        for ticket in (6201, 6202, 6203):
            st.add_ticket(ticket)
            sessions.append(admin.create_session(db, account_id=world.account_id, psa_connection_id=bad_id,
                                                 psa_ticket_id=ticket).id)
    # when three jobs on it run
    ids = [submit(ops_client, "resolve", s, f"Note {n}.") for n, s in enumerate(sessions[:2])]
    for job_id in ids:
        j = wait_terminal(job_id)
        assert (j.state, j.error_type) == ("failed", "PsaAuthError")
    # then one auth alert for the connection, and no per-job failure alert
    [alert] = wait_for(lambda: alerts(kind="auth_failed"), message="auth alert")
    assert alert.connection_id == bad_id and alert.job_id in ids
    assert alert.ticket_id == dict(zip(ids, (6201, 6202)))[alert.job_id]  # the ticket of the job that hit it
    assert alerts(kind="job_failed") == []
    delivered(alert.id)
    [body] = receiver.bodies()
    assert "PSA credentials rejected" in body["text"] and f"connection {bad_id}" in body["text"]
    assert "revoked-key" not in str(body)
    # when the keys are fixed, the next success on the connection closes the alert
    with session_scope() as db:
        db.execute(update(PsaConnection).where(PsaConnection.id == bad_id)
                   .values(private_key_encrypted=crypto.encrypt(st.private_key)))
    assert wait_terminal(submit(ops_client, "resolve", sessions[2], "Works now.")).state == "succeeded"
    closed = wait_for(lambda: (a := alerts(id=alert.id)[0]).resolved_at is not None and a, message="auth closed")
    assert f"the credentials of connection {bad_id} work again" in closed.resolution
    assert len(receiver.bodies()) == 1


def test_a_dead_webhook_is_retried_boundedly_and_never_holds_up_writebacks(world, alert_worker, receiver,
                                                                           ops_client):
    receiver.always = 500
    failing = submit(ops_client, "resolve", world.session(6301, reject_status_changes=True), "Done.")
    assert wait_terminal(failing, timeout=10).state == "verification_failed"
    finished = job(failing).finished_at
    # the writeback after it runs while the webhook keeps failing
    assert wait_terminal(submit(ops_client, "resolve", world.session(6302), "Done too."), timeout=10).state == \
        "succeeded"
    [alert] = wait_for(lambda: alerts(job_id=failing), message="alert row")
    gave_up = delivered(alert.id, "failed")
    assert (gave_up.delivery_attempts, gave_up.delivery_status_code) == (3, 500)
    assert "HTTP 500" in gave_up.delivery_error
    assert len(receiver.posts) == 3  # bounded: ALERT_WEBHOOK_MAX_ATTEMPTS
    assert all(p["at"] >= finished.timestamp() for p in receiver.posts)  # delivery came after, not inside, the job
    log = alert_worker.log_text()
    assert re.search(rf"webhook for alert {alert.id} gave up after 3 attempt\(s\)", log)
    assert "not-a-real-webhook-secret" not in log  # the webhook URL is a secret too


def test_stuck_jobs_alert_once_and_cancelling_one_closes_its_alert(world, alert_worker, receiver, ops_client):
    start = alert_worker.mark()
    assert celeryconfig.beat_schedule["writeback-check-stuck"]["task"] == "writeback.check_stuck"
    hour_ago = utcnow() - dt.timedelta(hours=1)
    with session_scope() as db:
        def new_job(ticket: int, **values) -> int:
            j = build_job(db, JobKind.RESOLVE, session_id=world.session(ticket), markdown="Stuck note.")
            for key, value in values.items():
                setattr(j, key, value)
            db.flush()
            return j.id
        lost = new_job(6401, next_attempt_at=hour_ago)  # its message was lost, no sweeper ran
        dead = new_job(6402, state="running", lease_until=hour_ago, attempts=1)  # its worker died
        behind = new_job(6402, next_attempt_at=hour_ago)  # waits for `dead`: not stuck itself
        fresh = new_job(6403)  # due just now
    # when beat's check runs (twice)
    ops_client.send_task("writeback.check_stuck", queue="writeback")
    stuck = wait_for(lambda: len(a := alerts(kind="job_stuck")) == 2 and a, message="stuck alerts")
    assert {a.job_id for a in stuck} == {lost, dead}
    assert all("due for" in a.message for a in stuck)
    wait_for(lambda: len(receiver.bodies()) == 2, message="two webhooks")
    assert all("Writeback job stuck" in b["text"] for b in receiver.bodies())
    ops_client.send_task("writeback.check_stuck", queue="writeback")
    wait_for(lambda: alert_worker.log_text(start).count("writeback.check_stuck[") >= 4, message="second check")
    # then nothing new: still two alerts, two pages; the waiting and the fresh job raised none
    assert len(alerts(kind="job_stuck")) == 2 and len(receiver.bodies()) == 2
    assert alerts(job_id=behind) == [] and alerts(job_id=fresh) == []
    # when the operator cancels the lost job, its alert closes
    assert repair.cancel(lost, actor="test", publish=lambda *a: True).ok
    assert alerts(job_id=lost)[0].resolved_at is not None


def test_reconciler_raises_the_alert_a_dead_worker_never_raised(world, alert_worker, receiver, ops_client):
    # given a job that ended verification_failed, but the worker died before alerting
    with session_scope() as db:
        j = build_job(db, JobKind.RESOLVE, session_id=world.session(6501), markdown="x")
        db.flush()
        db.execute(update(WritebackJob).where(WritebackJob.id == j.id).values(
            state="verification_failed", finished_at=utcnow() - dt.timedelta(minutes=2), expected_status_id=9,
            observed_status_id=1, error_message="ticket 6501: expected status 9, observed 1"))
        job_id = j.id
    ops_client.send_task("writeback.check_stuck", queue="writeback")
    [alert] = wait_for(lambda: alerts(job_id=job_id), message="reconciled alert")
    assert alert.kind == "verification_failed" and alert.details["reconciled"] is True
    delivered(alert.id)
    assert f"job {job_id}" in receiver.bodies()[0]["text"]


def test_a_stuck_job_that_runs_at_last_closes_its_alert_and_the_check_closes_any_left_open(world, alert_worker,
                                                                                            receiver, ops_client):
    # given two jobs whose messages were lost an hour ago, and their stuck alerts
    hour_ago = utcnow() - dt.timedelta(hours=1)
    with session_scope() as db:
        ids = []
        for ticket in (6601, 6602):
            j = build_job(db, JobKind.RESOLVE, session_id=world.session(ticket), markdown="Late note.")
            j.next_attempt_at = hour_ago
            db.flush()
            ids.append(j.id)
    runs, left_open = ids
    ops_client.send_task("writeback.check_stuck", queue="writeback")
    wait_for(lambda: {a.job_id for a in alerts(kind="job_stuck")} >= {runs, left_open}, message="stuck alerts")
    # when one finally runs, the worker closes its alert as it finishes
    publisher(ops_client)(runs, "resolve")
    assert wait_terminal(runs).state == "succeeded"
    [closed] = wait_for(lambda: [a for a in alerts(job_id=runs) if a.resolved_at is not None], message="closed")
    assert closed.resolution.startswith(f"job {runs} finished: succeeded")
    # and when the other finished but its worker died before closing the alert, the check closes it
    with session_scope() as db:
        db.execute(update(WritebackJob).where(WritebackJob.id == left_open).values(
            state="succeeded", finished_at=utcnow()))
    [still] = alerts(job_id=left_open)
    assert still.resolved_at is None
    from worker.alerts import run_checks

    assert run_checks()["closed"] == 1
    [now_closed] = alerts(job_id=left_open)
    assert now_closed.resolved_at is not None and "finished since" in now_closed.resolution
    assert run_checks()["closed"] == 0


def test_an_operator_resolves_exactly_the_one_alert_named(world):
    from worker.alerts import resolve

    with session_scope() as db:
        named, other = (Alert(kind=AlertKind.JOB_STUCK.value, account_id=world.account_id, message="m",
                              delivery_state="disabled") for _ in range(2))
        db.add_all([named, other])
        db.flush()
        named_id, other_id = named.id, other.id
    assert resolve(named_id, resolution="looked into it") == 1
    assert resolve(named_id, resolution="again") == 0  # already resolved: nothing to close
    [closed] = alerts(id=named_id)
    assert closed.resolved_at is not None and closed.resolution == "looked into it"
    assert alerts(id=other_id)[0].resolved_at is None
