"""Chaos fixtures: each test gets a private redis-server (so it can kill its broker without
touching the shared one or another test run), its own worker processes running the
production app plus an event recorder, and short timeouts so recoveries take seconds."""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests import harness

# Short but consistent: the lease floor is connect + 2 x read + 1 = 6 s (tasks.store).
CHAOS_ENV = {
    "PSA_CONNECT_TIMEOUT": "1",
    "PSA_READ_TIMEOUT": "2",
    "POST_SETTLE_SECONDS": "2",  # the production default: the read timeout
    "JOB_LEASE_SECONDS": "6",
    "SWEEP_INTERVAL_SECONDS": "1",
    "SWEEP_REPUBLISH_AFTER_SECONDS": "2",
    "DB_OUTAGE_RETRY_SECONDS": "1",
    "CELERY_VISIBILITY_TIMEOUT": "30",
}


class Chaos:
    def __init__(self, env: dict[str, str], broker: harness.RedisServer, tmp: Path) -> None:
        self.env, self.broker, self.tmp = env, broker, tmp
        self.event_log = Path(env["WRITEBACK_EVENT_LOG"])
        self.workers: list[harness.WorkerProcess] = []

    def worker(self, *, env: dict[str, str] | None = None, **opts: Any) -> harness.WorkerProcess:
        opts.setdefault("concurrency", 4)
        w = harness.WorkerProcess({**self.env, **(env or {})}, app="tests.chaos.eventsink",
                                  log_path=self.tmp / f"worker-{len(self.workers)}.log", **opts)
        self.workers.append(w)
        return w

    def events(self, name: str = "job_finished") -> list[dict[str, Any]]:
        if not self.event_log.exists():
            return []
        rows = [json.loads(line) for line in self.event_log.read_text().splitlines() if line.strip()]
        return [r for r in rows if r["event"] == name]

    def finished_count(self) -> Counter:
        return Counter(e["job_id"] for e in self.events("job_finished"))

    def logs(self) -> str:
        return "\n".join(f"=== {w.log_path}\n{w.log_text()[-4000:]}" for w in self.workers)

    def stop_all(self) -> None:
        for w in self.workers:  # no warm shutdown: the broker and the test's rows go away anyway
            w.kill_group()
            w.stop()


@pytest.fixture()
def broker():
    server = harness.RedisServer().start()
    yield server
    server.stop()


@pytest.fixture()
def chaos(broker, tmp_path, db_clean):
    env = {**os.environ, **CHAOS_ENV, "CELERY_BROKER_URL": broker.url,
           "WRITEBACK_EVENT_LOG": str(tmp_path / "events.jsonl")}
    env.pop("CELERY_REDIS_KEY_PREFIX", None)  # a private server needs no prefix
    saved = {k: os.environ.get(k) for k in CHAOS_ENV}
    os.environ.update(CHAOS_ENV)  # this process publishes and sweeps with the same settings
    try:
        with harness.publishing_to(broker.url):
            c = Chaos(env, broker, tmp_path)
            try:
                yield c
            finally:
                c.stop_all()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
