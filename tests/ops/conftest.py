"""Operations tests: real worker processes, a real webhook receiver on loopback, real Flower.

The workers here run with extra settings (ALERT_WEBHOOK_URL, METRICS_PORT, LOG_FORMAT...),
so they get a Redis database of their own (TEST_OPS_REDIS_DB, default 12): a message meant
for them is never taken by the suite's shared worker, which does not have those settings.
Jobs are therefore inserted with the enqueue API's own builder and announced on that broker.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from models import JobKind
from models.db import session_scope
from tasks.enqueue import TASK_NAMES, build_job
from tests import harness

OPS_BROKER_URL = f"{harness.REDIS_BASE}/{int(os.environ.get('TEST_OPS_REDIS_DB', '12'))}"
ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "worker.cli"]


class Receiver(ThreadingHTTPServer):
    """A webhook endpoint on loopback that records every POST; `statuses` are answered in
    order (then 200), and `hang` makes it sleep before answering."""
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ReceiverHandler)
        self.posts: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        self.always: int | None = None
        self.hang = 0.0
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        # A path shaped like a Slack webhook's: the secret part must never be logged.
        return f"http://127.0.0.1:{self.server_address[1]}/services/T0FAKE/B0FAKE/not-a-real-webhook-secret"

    def reset(self) -> None:
        with self.lock:
            self.posts.clear()
            self.statuses.clear()
            self.always, self.hang = None, 0.0

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [p["body"] for p in self.posts]


class _ReceiverHandler(BaseHTTPRequestHandler):
    server: Receiver

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            self.server.posts.append({"path": self.path, "body": json.loads(raw or b"null"), "at": time.time()})
            status = self.server.statuses.pop(0) if self.server.statuses else (self.server.always or 200)
            hang = self.server.hang
        if hang:
            time.sleep(hang)
        reply = b"ok" if status < 300 else b"invalid_token"
        self.send_response(status)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


@pytest.fixture(scope="session")
def ops_broker():
    yield OPS_BROKER_URL
    # Keys carry this run's CELERY_REDIS_KEY_PREFIX (tests/conftest.py): drop only ours.
    client = redis.Redis.from_url(OPS_BROKER_URL)
    for key in client.scan_iter(match=os.environ.get("CELERY_REDIS_KEY_PREFIX", "") + "*", count=1000):
        client.delete(key)


class OpsClient:
    """Sends by name to this package's broker. An explicit connection is needed: Celery lets
    CELERY_BROKER_URL (set for the whole suite) override any app's own broker setting."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.app = Celery("ops-tests")
        # Same per-run key prefix as the workers (inherited from tests/conftest.py's environment).
        self.app.conf.broker_transport_options = {"global_keyprefix": os.environ.get("CELERY_REDIS_KEY_PREFIX", "")}

    def send_task(self, name: str, kwargs: dict[str, Any] | None = None, **options: Any) -> None:
        options.setdefault("queue", "writeback")
        with self.app.connection_for_write(self.url) as conn:
            self.app.send_task(name, kwargs=kwargs or {}, connection=conn, **options)


@pytest.fixture(scope="session")
def ops_client(ops_broker) -> OpsClient:
    return OpsClient(ops_broker)


@pytest.fixture()
def ops_events(ops_client):
    """`ops_events()` starts listening to every Celery task event on this package's broker
    (what Flower builds its views from); each capture started is stopped at teardown."""
    started: list[harness.TaskEvents] = []

    def start(**options: Any) -> harness.TaskEvents:
        events = harness.TaskEvents(ops_client.url, dict(ops_client.app.conf.broker_transport_options), **options)
        started.append(events.start())
        return events

    yield start
    for events in started:
        events.stop()


def ops_env(broker: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "CELERY_BROKER_URL": broker, **{k: str(v) for k, v in extra.items()}}


def start_worker(broker: str, tmp: Path, **extra: str) -> harness.WorkerProcess:
    # The settle time after a failed POST (tasks.retry) is not what these tests are about.
    extra.setdefault("POST_SETTLE_SECONDS", "0.3")
    return harness.WorkerProcess(ops_env(broker, **extra), concurrency=8,
                                 log_path=tmp / f"worker-{time.monotonic_ns()}.log").start()


def submit(client: OpsClient, kind: str, session_id: int, markdown: str | None = None, **intent: Any) -> int:
    """What the enqueue API does, with the message sent to this package's broker."""
    with session_scope() as db:
        job = build_job(db, JobKind(kind), session_id=session_id, markdown=markdown, **intent)
        db.flush()
        job_id = job.id
    client.send_task(TASK_NAMES[JobKind(kind)], kwargs={"job_id": job_id}, queue="writeback")
    return job_id


def procfile_command(name: str) -> list[str]:
    """A Procfile line as the process manager runs it: through a shell, with the project's
    virtualenv first on PATH (as it is in a deployed image)."""
    line = next(ln for ln in (ROOT / "Procfile").read_text().splitlines() if ln.startswith(f"{name}:"))
    return ["bash", "-c", "exec " + line.split(":", 1)[1].strip()]


def procfile_env(broker: str, **extra: str) -> dict[str, str]:
    env = ops_env(broker, **extra)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, *args], capture_output=True, env=env, cwd=ROOT, timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())
