"""Flower, started for real from the Procfile line against the test Redis, in front of a real
worker writing JSON logs; and proof that neither the logs nor Flower ever carry a note body
or a credential."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import pytest
import requests

from sqlalchemy import select

from models import PsaConnection, WritebackJob
from models.db import session_scope
from tasks import admin
from tests.factories import session_row, wait_terminal
from tests.harness import free_port, wait_for
from tests.ops.conftest import ROOT, procfile_command, procfile_env, start_worker, submit

AUTH = ("ops", "fake-test-password")


@pytest.fixture(scope="module")
def json_worker(ops_broker, tmp_path_factory):
    proc = start_worker(ops_broker, tmp_path_factory.mktemp("jsonlogs"), LOG_FORMAT="json")
    yield proc
    proc.stop()


class Flower:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path) -> None:
        self.proc, self.url, self.log_path = proc, f"http://127.0.0.1:{port}", log_path

    def get(self, path: str, auth: tuple[str, str] | None = AUTH) -> requests.Response:
        return requests.get(self.url + path, auth=auth, timeout=10)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_flower(broker: str, log_path, **env: str) -> Flower:
    port = free_port()
    proc = subprocess.Popen(procfile_command("flower"), cwd=ROOT, env=procfile_env(
        broker, PORT=str(port), FLOWER_ADDRESS="127.0.0.1", **env), stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT)
    flower = Flower(proc, port, log_path)
    wait_for(lambda: _answers(flower), timeout=30, message="flower /healthcheck")
    return flower


def _answers(flower: Flower) -> bool:
    if flower.proc.poll() is not None:
        raise AssertionError(f"flower exited: {flower.log_path.read_text()[-2000:]}")
    try:
        return flower.get("/healthcheck", auth=None).status_code == 200
    except requests.ConnectionError:
        return False


@pytest.fixture(scope="module")
def flower(ops_broker, json_worker, tmp_path_factory):
    f = start_flower(ops_broker, tmp_path_factory.mktemp("flower") / "flower.log",
                     FLOWER_BASIC_AUTH=":".join(AUTH))
    # Flower sees the worker through its events (heartbeats) before any task is sent.
    host = json_worker.name.split("@")[0] + "@"
    wait_for(lambda: any(k.startswith(host) and alive for k, alive in f.get("/api/workers?status=1").json().items()),
             timeout=20, message="worker alive in flower")
    yield f
    f.stop()


def flower_task(flower: Flower, predicate, message: str) -> dict:
    def find():
        tasks = flower.get("/api/tasks?limit=1000").json()
        return next((dict(t, uuid=u) for u, t in tasks.items() if predicate(t)), None)
    return wait_for(find, timeout=20, message=message)


def test_flower_launcher_refuses_to_start_without_credentials(ops_broker, tmp_path):
    base = {k: v for k, v in procfile_env(ops_broker).items() if not k.startswith("FLOWER_")}
    refused = subprocess.run(procfile_command("flower"), cwd=ROOT, env=base, capture_output=True, text=True,
                             timeout=30)
    assert refused.returncode == 2
    assert "refusing to start Flower without authentication" in refused.stderr and "FLOWER_INSECURE_DEV" in \
        refused.stderr
    weak = subprocess.run(procfile_command("flower"), cwd=ROOT, env={**base, "FLOWER_BASIC_AUTH": "ops:short"},
                          capture_output=True, text=True, timeout=30)
    assert weak.returncode == 2 and "shorter than 12" in weak.stderr
    on_argv = subprocess.run([sys.executable, "-m", "worker.flower", "--basic-auth=ops:fake-test-password"], cwd=ROOT,
                             env={**base, "FLOWER_BASIC_AUTH": ":".join(AUTH)}, capture_output=True, text=True,
                             timeout=30)
    assert on_argv.returncode == 2 and "not on the command line" in on_argv.stderr
    # the clearly named development flag starts it open, and says so
    dev = start_flower(ops_broker, tmp_path / "dev.log", FLOWER_INSECURE_DEV="1")
    try:
        assert dev.get("/workers", auth=None).status_code == 200  # the UI is open to anyone: dev only
    finally:
        dev.stop()
    assert "WITHOUT authentication" in (tmp_path / "dev.log").read_text()


def test_flower_shows_worker_and_tasks_to_authenticated_users_only(world, json_worker, flower, ops_client):
    # without credentials, or with a wrong password, nothing is shown
    for path in ("/api/workers", "/api/tasks", "/", "/tasks"):
        assert flower.get(path, auth=None).status_code == 401, path
    assert flower.get("/api/tasks", auth=("ops", "wrong-password-123")).status_code == 401
    # when a job runs, and another needs one retry after a 503
    world.sim.state.add_fault(action="error", status=503, operation="post_note", times=1, ticket_id=8002)
    ok = submit(ops_client, "resolve", world.session(8001), "Swapped the cable.")
    retried = submit(ops_client, "resolve", world.session(8002), "Swapped the cable again.")
    assert wait_terminal(ok).state == wait_terminal(retried).state == "succeeded"
    # then Flower lists the worker and both tasks with name, state, runtime, retries and ids only
    workers = flower.get("/api/workers?refresh=1").json()
    assert any(name.startswith(json_worker.name.split("@")[0] + "@") for name in workers)
    first = flower_task(flower, lambda t: t.get("kwargs") == f"{{'job_id': {ok}}}" and t["state"] == "SUCCESS",
                        "job task in flower")
    assert first["name"] == "writeback.resolve" and first["runtime"] > 0 and first["retries"] == 0
    assert first["worker"].startswith(json_worker.name.split("@")[0])
    second = flower_task(flower, lambda t: t.get("kwargs") == f"{{'job_id': {retried}}}" and t["state"] == "SUCCESS",
                         "retried task in flower")
    assert second["retries"] == 1
    assert "'state': 'succeeded'" in second["result"]


def test_no_credential_or_note_body_in_any_log_line_or_in_flower(world, json_worker, flower, ops_client, ops_events):
    st = world.sim.state
    log_start = json_worker.mark()  # the worker's log holds earlier tests' lines: read this test's below
    bodies = [f"ZEBRA-{n} fuser replaced; customer password is hunter{n}" for n in range(4)]
    with session_scope() as db:
        revoked = admin.add_connection(db, account_id=world.account_id, provider="connectwise",
                                       base_url=world.sim.base_url, company_id=st.company_id, client_id=st.client_id,
                                       public_key=st.public_key, private_key="revoked-private-ZZ9")
        st.add_ticket(8104)
        dead_sid = admin.create_session(db, account_id=world.account_id, psa_connection_id=revoked.id,
                                        psa_ticket_id=8104).id
    st.add_fault(action="error", status=503, operation="post_note", times=1, ticket_id=8101)
    st.add_fault(action="error", status=503, operation="post_note", times=1, ticket_id=8103)  # a retry by name
    events = ops_events(type_prefix="")  # every event, worker ones too: all of it is checked for leaks
    # given jobs that verify, retry, post internally, are sent by name with the markdown, and hit dead keys
    resolve_id = submit(ops_client, "resolve", world.session(8101), bodies[0])
    escalate_id = submit(ops_client, "escalate", world.session(8102), bodies[1])
    by_name_sid = world.session(8103)
    ops_client.send_task("writeback.resolve", kwargs={"session_id": by_name_sid, "markdown": bodies[2]})
    dead_id = submit(ops_client, "resolve", dead_sid, bodies[3])
    assert wait_terminal(resolve_id).state == wait_terminal(escalate_id).state == "succeeded"
    assert wait_terminal(dead_id).state == "failed"
    wait_for(lambda: session_row(by_name_sid).status == "resolved", message="by-name job")
    with session_scope() as db:
        by_name_job = db.scalar(select(WritebackJob.id).where(WritebackJob.session_id == by_name_sid))
    # its retry carried only the job id (the markdown never travels twice), and its first
    # delivery, with the intent, showed the markdown redacted
    by_name = flower_task(flower, lambda t: t.get("kwargs") == f"{{'job_id': {by_name_job}}}" and
                          t["state"] == "SUCCESS", "by-name task in flower")
    received = wait_for(lambda: events.of(by_name["uuid"], "task-received"), message="the by-name task's deliveries")
    assert received[0]["kwargs"] == f"{{'session_id': {by_name_sid}, 'markdown': '<str redacted>'}}"
    flower_task(flower, lambda t: t.get("kwargs") == f"{{'job_id': {dead_id}}}" and t["state"] == "FAILURE",
                "failed task in flower")
    time.sleep(0.5)  # let the last lines reach the log file

    # everything Flower serves about these tasks, and every line the worker wrote
    tasks = flower.get("/api/tasks?limit=1000").json()
    events.stop()
    captured = events.snapshot()
    assert any(e["type"] == "task-retried" for e in captured)
    seen = [json.dumps(captured, default=str), json.dumps(tasks)] + [flower.get(f"/api/task/info/{u}").text for u in tasks] + \
        [flower.get(f"/task/{u}").text for u in tasks] + [flower.get("/tasks/datatable?draw=1&start=0&length=100"
                                                                     "&search[value]=&order[0][column]=0"
                                                                     "&columns[0][data]=name&order[0][dir]=asc").text]
    log = json_worker.log_text()  # the whole log, earlier tests' lines too: nothing may leak anywhere
    secrets = [st.private_key, "revoked-private-ZZ9", st.public_key]
    for private in (st.private_key, "revoked-private-ZZ9"):
        secrets.append(base64.b64encode(f"{st.company_id}+{st.public_key}:{private}".encode()).decode())
    for text, where in [(log, "worker log")] + [(t, "flower") for t in seen]:
        for needle in bodies + [b.split(";")[0] for b in bodies] + secrets:
            assert needle not in text, f"{needle!r} leaked into {where}"
    with session_scope() as db:  # the keys are really in use: encrypted at rest, never in clear
        assert db.get(PsaConnection, revoked.id).private_key_encrypted != b"revoked-private-ZZ9"

    # and each step is one structured JSON line carrying job, task, account, provider and ticket
    lines = [json.loads(ln) for ln in json_worker.log_text(since=log_start).splitlines() if ln.startswith("{")]
    mine = [ln for ln in lines if ln.get("job_id") == resolve_id]
    steps = {ln.get("step") for ln in mine}
    assert {"claim", "post", "patch", "verify", "outcome"} <= steps, steps
    for ln in (ln for ln in mine if ln.get("step") in ("claim", "post", "patch", "verify", "outcome")):
        assert ln["task_id"] and ln["account_id"] == world.account_id, ln
        assert (ln["provider"], ln["ticket_id"]) == ("connectwise", 8101), ln
    assert any(ln.get("step") == "alert" and ln["level"] == "ERROR" for ln in lines)  # the auth alert
