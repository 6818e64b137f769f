"""Prometheus metrics, scraped over HTTP from real processes: the worker's own counters
(threads pool, and prefork in multiprocess mode) and the Procfile's `metrics` process."""
from __future__ import annotations

import datetime as dt
import os
import subprocess

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from models import JobKind, utcnow
from models.db import session_scope
from tasks.enqueue import build_job
from tests.factories import wait_terminal
from tests.harness import free_port, wait_for
from tests.ops.conftest import ROOT, procfile_command, procfile_env, start_worker, submit

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text  # computed at scrape time: slow on a loaded machine, not a speed test
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


@pytest.fixture(scope="module")
def metrics_worker(ops_broker, tmp_path_factory):
    port = free_port()
    proc = start_worker(ops_broker, tmp_path_factory.mktemp("metrics"), METRICS_PORT=str(port))
    proc.metrics_port = port
    yield proc
    proc.stop()


def test_worker_counts_writebacks_verification_failures_retries_and_psa_latency(world, metrics_worker, ops_client):
    # given three jobs: one verifies, one is silently rejected, one needs a retry after a 503
    world.sim.state.add_fault(action="error", status=503, operation="post_note", times=1, ticket_id=7003)
    ok = submit(ops_client, "resolve", world.session(7001), "Fixed.")
    rejected = submit(ops_client, "resolve", world.session(7002, reject_status_changes=True), "Fixed?")
    retried = submit(ops_client, "escalate", world.session(7003), "## Problem\nDNS.")
    assert [wait_terminal(j).state for j in (ok, rejected, retried)] == ["succeeded", "verification_failed",
                                                                          "succeeded"]
    # when Prometheus scrapes the worker
    s = wait_for(lambda: (x := scrape(metrics_worker.metrics_port)) and total(x, "psa_writeback_writebacks_total")
                 == 3 and x, message="three writebacks counted")
    # then outcomes by provider and kind, verification failures and retries are counted
    assert value(s, "psa_writeback_writebacks_total", provider="connectwise", kind="resolve", outcome="succeeded") == 1
    assert value(s, "psa_writeback_writebacks_total", provider="connectwise", kind="resolve",
                 outcome="verification_failed") == 1
    assert value(s, "psa_writeback_writebacks_total", provider="connectwise", kind="escalate",
                 outcome="succeeded") == 1
    assert value(s, "psa_writeback_verification_failures_total", provider="connectwise", kind="resolve") == 1
    assert value(s, "psa_writeback_retries_total", provider="connectwise", kind="escalate",
                 error_type="PsaTransientError") == 1
    # and PSA latency per provider and operation: 4 POSTs (one a 503), 3 PATCHes
    assert value(s, "psa_writeback_psa_request_duration_seconds_count", provider="connectwise",
                 operation="post_note") == 4
    assert value(s, "psa_writeback_psa_request_duration_seconds_count", provider="connectwise",
                 operation="update_status") == 3
    assert value(s, "psa_writeback_psa_requests_total", provider="connectwise", operation="post_note",
                 result="5xx") == 1
    assert value(s, "psa_writeback_psa_request_duration_seconds_sum", provider="connectwise",
                 operation="get_ticket") > 0
    assert value(s, "psa_writeback_alerts_raised_total", kind="verification_failed") == 1


def test_procfile_metrics_process_reports_queue_depth_and_oldest_due_age(world, ops_broker, ops_client, tmp_path):
    # given messages waiting in the drafting queue (no drafting worker here) at three priorities,
    # which kombu keeps in three Redis lists
    for priority in (0, 6, 9):
        ops_client.send_task("writeback.draft_preview", {"session_id": 1, "kind": "resolve"}, queue="drafting",
                             priority=priority)
    # and jobs waiting in each state, none with a worker to run them
    now = utcnow()
    with session_scope() as db:
        for ticket, values in ((7101, {"next_attempt_at": now - dt.timedelta(seconds=300)}),
                               (7102, {"next_attempt_at": now - dt.timedelta(seconds=20)}),
                               (7103, {"state": "retrying", "next_attempt_at": now + dt.timedelta(minutes=5)}),
                               (7104, {"state": "running", "lease_until": now + dt.timedelta(minutes=5)})):
            job = build_job(db, JobKind.RESOLVE, session_id=world.session(ticket), markdown="Waiting.")
            for key, v in values.items():
                setattr(job, key, v)
    # when the Procfile's `metrics` process runs and is scraped
    port = free_port()
    proc = subprocess.Popen(procfile_command("metrics"), cwd=ROOT,
                            env=procfile_env(ops_broker, QUEUE_METRICS_PORT=str(port), QUEUE_METRICS_ADDR="127.0.0.1",
                                             STUCK_AFTER_SECONDS="120"),
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "metrics.log", "wb"))
    try:
        s = wait_for(lambda: _try_scrape(port), timeout=20, message="metrics process")
    finally:
        proc.terminate()
        proc.wait(10)
    # then it reports the queue from the database
    assert value(s, "psa_writeback_metrics_db_up") == 1
    assert value(s, "psa_writeback_queue_depth", state="queued") == 2
    assert value(s, "psa_writeback_queue_depth", state="retrying") == 1
    assert value(s, "psa_writeback_queue_depth", state="running") == 1
    assert 300 <= value(s, "psa_writeback_oldest_due_job_age_seconds") < 360
    assert value(s, "psa_writeback_stuck_jobs") == 1  # only the one due for 5 minutes (threshold 120 s)
    assert value(s, "psa_writeback_broker_queue_length", queue="writeback") == 0
    assert value(s, "psa_writeback_broker_queue_length", queue="drafting") == 3
    client = redis.Redis.from_url(ops_broker)  # no later test should meet these messages
    client.delete(*[os.environ.get("CELERY_REDIS_KEY_PREFIX", "") + name
                    for name in ["drafting"] + [f"drafting\x06\x16{step}" for step in (3, 6, 9)]])
    assert ("psa_writeback_open_alerts", frozenset({("kind", "verification_failed")})) in s


def test_procfile_metrics_process_binds_the_address_it_is_given(ops_broker, tmp_path):
    port = free_port()
    proc = subprocess.Popen(procfile_command("metrics"), cwd=ROOT,
                            env=procfile_env(ops_broker, QUEUE_METRICS_PORT=str(port), QUEUE_METRICS_ADDR="127.0.0.2"),
                            stdout=open(tmp_path / "metrics.out", "wb"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _answers(f"http://127.0.0.2:{port}/metrics"), timeout=20, message="metrics on 127.0.0.2")
        assert not _answers(f"http://127.0.0.1:{port}/metrics")  # only the address named
    finally:
        proc.terminate()
        proc.wait(10)
    assert f"psa-writeback metrics on http://127.0.0.2:{port}/metrics" in (tmp_path / "metrics.out").read_text()


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=15).status_code == 200
    except requests.ConnectionError:
        return False


def _try_scrape(port: int) -> Samples | None:
    try:
        return scrape(port)
    except requests.ConnectionError:
        return None
