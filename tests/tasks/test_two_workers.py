"""The fairness priority and the in-flight cap per PSA connection hold across worker processes
(issue 14): both live in Redis and PostgreSQL, nothing in a worker's memory. Two real worker
processes (distinct node names, one broker, one database), simulators over HTTP.

The two tests start a pair each rather than sharing one: the cap is a process setting, and
they need it on opposite sides of the pools' size. Below it, so the cap is what holds tenant
A back; at it, so A's flood fills both pools and only the priority lets tenant B through (with
a binding cap, the threads it frees would let B through whatever the priority)."""
from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from models import WritebackAttempt, WritebackJob
from models.db import session_scope
from providers.simulators.connectwise import SimulatorServer
from tasks import enqueue_resolve
from tests import harness
from tests.factories import RESOLVED, World, attempts, wait_terminal
from tests.harness import wait_for

THREADS = 4  # per worker process


@pytest.fixture(scope="module")
def broker():
    """The module's own redis-server (harness.private_broker), shared by its tests."""
    with harness.private_broker() as server:
        yield server


@pytest.fixture()
def other_sim():
    server = SimulatorServer().start()
    yield server
    server.stop()


@contextlib.contextmanager
def two_workers(broker: harness.RedisServer, tmp: Path, **env: str) -> Iterator[list[harness.WorkerProcess]]:
    base = {**os.environ, "CELERY_BROKER_URL": broker.url, **env}
    base.pop("CELERY_REDIS_KEY_PREFIX", None)  # a private server needs no prefix
    workers = [harness.WorkerProcess(base, concurrency=THREADS, log_path=tmp / f"worker-{n}.log") for n in range(2)]
    try:
        with ThreadPoolExecutor(2) as pool:  # both start at once: the box is shared and slow
            list(pool.map(lambda w: w.start(timeout=60), workers))
        yield workers
    finally:
        for w in workers:
            w.stop()


def node(worker: harness.WorkerProcess) -> str:
    return worker.name.split("@")[0]  # what an attempt row's `worker` starts with


def ran(job_ids: list[int]) -> list[WritebackAttempt]:
    """The executions that made the PSA calls (not those our limiter deferred)."""
    with session_scope() as db:
        return list(db.scalars(select(WritebackAttempt).where(WritebackAttempt.job_id.in_(job_ids),
                                                              WritebackAttempt.outcome != "deferred")))


def finished(job_ids: list[int]) -> int:
    with session_scope() as db:
        return db.scalar(select(func.count()).where(WritebackJob.id.in_(job_ids), WritebackJob.finished_at.is_not(None)))


def test_the_in_flight_cap_is_one_for_both_worker_processes_together(broker, db_clean, sim, tmp_path):
    # given tenant A's PSA answering every call after 0.3 s, and two worker processes of 4
    # threads each sharing a cap of 2 jobs in flight per connection: were the cap each
    # process's own, A's PSA would see up to 4 of A's jobs at once
    cap, count = 2, 8
    a = World.create(sim, account_id=1)
    sim.state.latency = 0.3
    tickets = [31_000 + n for n in range(count)]
    with two_workers(broker, tmp_path, PSA_MAX_INFLIGHT_PER_CONNECTION=str(cap)) as workers:
        # when A enqueues 8 resolves at once (8 threads free to take them)
        ids = [enqueue_resolve(None, a.session(t), f"Tenant A note {t}.") for t in tickets]
        rows = [wait_terminal(i, timeout=90) for i in ids]
    # then A's PSA never had more than 2 of A's calls at once, and had 2
    assert sim.state.max_in_flight == cap, sim.state.max_in_flight
    # and both processes ran A's jobs, at the same time: the cap was theirs together
    executions = ran(ids)
    assert {x.worker.split("@")[0] for x in executions} == {node(w) for w in workers}
    spans = [(x.worker, x.started_at, x.finished_at) for x in executions if x.finished_at is not None]
    assert any(wx != wy and x0 < y1 and y0 < x1 for (wx, x0, x1), (wy, y0, y1) in itertools.combinations(spans, 2)), \
        "no two processes ran A's jobs at once"
    # and the jobs over the cap were deferred by it, not lost: all succeeded, one note each
    deferrals = [x for i in ids for x in attempts(i) if x.outcome == "deferred"]
    assert deferrals and all(x.error_type == "InflightCapReached" for x in deferrals)
    assert all(r.state == "succeeded" and r.result["outcome"] == "verified" for r in rows), \
        [(r.id, r.state, r.error_message) for r in rows]
    assert [len(sim.state.notes(t)) for t in tickets] == [1] * count
    assert all(sim.state.status_of(t) == RESOLVED for t in tickets)
    # and every slot was given back
    client = redis.Redis.from_url(broker.url)
    assert all(client.zcard(k) == 0 for k in client.scan_iter(match="*psa-writeback:inflight:*"))


def test_tenant_bs_one_resolve_overtakes_tenant_as_flood_on_both_worker_processes(broker, db_clean, sim, other_sim,
                                                                                 tmp_path):
    # given two worker processes of 4 threads each, a cap (8) that lets tenant A fill both
    # pools, and A's 200 resolves queued at once, each ~1 s at its PSA (5 calls x 0.2 s): in
    # one FIFO a job enqueued after them would wait at least 200 / 8 x 1 s = 25 s
    flood = 200
    a, b = World.create(sim, account_id=1), World.create(other_sim, account_id=2)
    sim.state.latency = 0.2
    a_tickets = [32_000 + n for n in range(flood)]
    a_sessions = [a.session(t) for t in a_tickets]
    b_session = b.session(33_000)
    with two_workers(broker, tmp_path, PSA_MAX_INFLIGHT_PER_CONNECTION=str(2 * THREADS)) as workers:
        with session_scope() as db:
            a_jobs = [enqueue_resolve(db, sid, f"Sweep {sid}.") for sid in a_sessions]
        wait_for(lambda: len(x := ran(a_jobs)) >= 2 * THREADS and len({y.worker for y in x}) == 2, timeout=30,
                 message="A's jobs under way on both workers")
        # when tenant B enqueues one resolve
        started = time.monotonic()
        b_job = wait_terminal(enqueue_resolve(None, b_session, "Tenant B's one resolve."), timeout=90)
        b_seconds, a_done = time.monotonic() - started, finished(a_jobs)
        # then B is done within a few of A's jobs' time, while most of A's flood still waits
        assert b_job.state == "succeeded" and b_job.result["outcome"] == "verified"
        assert a_done < flood // 2, (a_done, b_seconds)
        assert b_seconds < 15, (b_seconds, a_done)
        assert {x.worker.split("@")[0] for x in ran([b_job.id])} <= {node(w) for w in workers}
        # and A's flood still completes, every job succeeded with one note (the PSA speeds up)
        sim.state.latency = 0.0
        wait_for(lambda: finished(a_jobs) == flood, timeout=120, interval=0.5, message="A's flood to finish")
    with session_scope() as db:
        states = dict(db.execute(select(WritebackJob.state, func.count()).where(WritebackJob.id.in_(a_jobs))
                                 .group_by(WritebackJob.state)).all())
    assert states == {"succeeded": flood}, states
    assert all(len(sim.state.notes(t)) == 1 for t in a_tickets)
    print(f"\nB done in {b_seconds:.1f}s with {a_done} of A's {flood} finished")
