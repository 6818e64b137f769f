"""Real parts for the tests: a fresh PostgreSQL database, a Redis database, a Celery worker
process, and the ConnectWise simulator. Imported by conftest; usable from bench/ too."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg2
from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get("TEST_DATABASE_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_BASE = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
# An obviously fake key, generated per run: tests never see a real credential.
FAKE_FERNET_KEY = "ZmFrZS10ZXN0LWtleS1ub3QtYS1yZWFsLXNlY3JldCE="

TEST_ENV = {
    "PSA_WRITEBACK_ENCRYPTION_KEYS": FAKE_FERNET_KEY,
    "VERIFY_READS": "3",
    "VERIFY_INTERVAL_SECONDS": "0.05",
    "RETRY_BASE_SECONDS": "0.2",
    "RETRY_MAX_DELAY_SECONDS": "2",
    "PSA_READ_TIMEOUT": "3",
    "JOB_LEASE_SECONDS": "20",
    "SWEEP_INTERVAL_SECONDS": "1",
    "SWEEP_REPUBLISH_AFTER_SECONDS": "2",
    "CELERY_VISIBILITY_TIMEOUT": "30",
}


def create_database() -> str:
    name = f"pswb_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    conn = psycopg2.connect(ADMIN_URL.replace("postgresql+psycopg2://", "postgresql://"))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    conn = psycopg2.connect(ADMIN_URL.replace("postgresql+psycopg2://", "postgresql://"))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
    conn.close()


def truncate_all(engine: Any) -> None:
    from models import Base

    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


class WorkerProcess:
    """`celery -A worker worker` as a real subprocess (its own process group)."""

    def __init__(self, env: dict[str, str], *, pool: str = "threads", concurrency: int = 8,
                 queues: str = "writeback", beat: bool = False, log_path: Path | None = None,
                 extra: list[str] | None = None) -> None:
        self.env = env
        self.log_path = log_path or Path(f"/tmp/pswb-worker-{uuid.uuid4().hex[:8]}.log")
        self.name = f"w{uuid.uuid4().hex[:6]}@%h"
        self.args = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-P", pool, "-c", str(concurrency),
                     "-Q", queues, "-n", self.name, "-l", "INFO", "--without-gossip", "--without-mingle"]
        if beat:
            self.args += ["-B", "-s", str(self.log_path.with_suffix(".beat"))]
        self.args += extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> "WorkerProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early; log:\n{self.log_text()[-3000:]}")
            if " ready." in self.log_text():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready in {timeout}s; log:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def children(self) -> list[int]:
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill_group(self) -> None:
        """SIGKILL the whole process group: no warm shutdown, no message restored."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
        if getattr(self, "_log", None):
            self._log.close()


def wait_for(predicate, timeout: float = 30, interval: float = 0.1, message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")
