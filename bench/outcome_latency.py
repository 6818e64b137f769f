"""Commit-to-waiter latency of wait_for_outcome with many waiters (issue 13). Not part of CI.

    .venv/bin/python -m bench.outcome_latency [--waiters 200] [--rounds 3] [--sim-latency 0.2]
                                              [--out bench/results/outcome_latency.txt]

Starts what bench.throughput starts (a fresh database, the ConnectWise simulator with
`--sim-latency` seconds per call, as a PSA answers, a
worker with the shipped defaults). Each round commits `--waiters` resolves, runs one waiting
thread per job in this process, all on its one LISTEN connection, and publishes the jobs
once every waiter is subscribed. Latency per job:
the moment its waiter returned minus the job row's finished_at, which the worker takes just
before sending the outcome statement (so the figure is an upper bound of commit → waiter).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import throughput as T  # noqa: E402
from tests import harness  # noqa: E402


def one_round(conn_id: int, account: int, waiters: int, first_ticket: int) -> tuple[list[float], dict]:
    from sqlalchemy import select

    from models import WritebackJob
    from models.db import session_scope
    from tasks.enqueue import publish
    from tasks.outcome_listener import listener
    from tasks.outcome_wait import wait_for_outcome

    jobs = unpublished_jobs(T.make_sessions(account, conn_id, waiters, first_ticket))
    woke: dict[int, dt.datetime] = {}
    heard = notification_times(listener())
    statuses: dict[int, str] = {}

    def wait(job_id: int) -> None:
        o = wait_for_outcome(job_id, timeout=300)
        woke[job_id] = dt.datetime.now(dt.timezone.utc)
        statuses[job_id] = o.status

    threads = [threading.Thread(target=wait, args=(j,), daemon=True) for j in jobs]
    for thread in threads:
        thread.start()
    lst = listener()
    harness.wait_for(lambda: lst.waiting() >= len(jobs), timeout=120, message="waiters subscribed")
    listen_conns = listen_connections()
    for job_id in jobs:  # only now may the worker run them: every waiter is subscribed
        publish(job_id, "resolve")
    for thread in threads:
        thread.join(300)
    with session_scope() as db:
        finished = dict(db.execute(select(WritebackJob.id, WritebackJob.finished_at)
                                   .where(WritebackJob.id.in_(jobs))).all())
    latencies = [(woke[j] - finished[j]).total_seconds() * 1000 for j in jobs if j in woke and finished[j]]
    to_listener = [(heard[j] - finished[j]).total_seconds() * 1000 for j in jobs if j in heard and finished[j]]
    to_waiter = [(woke[j] - heard[j]).total_seconds() * 1000 for j in jobs if j in heard and j in woke]
    counts: dict[str, int] = {}
    for s in statuses.values():
        counts[s] = counts.get(s, 0) + 1
    return latencies, {"statuses": counts, "listen_connections": listen_conns,
                       "finished_at_to_notification_p50_ms": round(T.percentile(to_listener, 50), 1),
                       "notification_to_waiter_p50_ms": round(T.percentile(to_waiter, 50), 1)}


def notification_times(lst) -> dict[int, dt.datetime]:
    """When this process's listener received each job's notification (to split the latency
    into the worker's commit and delivery, and the waiter's wake-up and read)."""
    from models.notify import JOB_CHANNEL

    heard: dict[int, dt.datetime] = {}
    wake = lst._wake

    def timed(key):
        if key is not None and key[0] == JOB_CHANNEL:
            heard.setdefault(int(key[1]), dt.datetime.now(dt.timezone.utc))
        wake(key)

    lst._wake = timed
    return heard


def unpublished_jobs(session_ids: list[int]) -> list[int]:
    """Resolve jobs committed but not announced to the broker (no sweeper runs here)."""
    from models import JobKind
    from models.db import session_scope
    from tasks.enqueue import build_job

    with session_scope() as db:
        return [build_job(db, JobKind.RESOLVE, session_id=sid, markdown=f"Benchmark resolution {sid}.").id
                for sid in session_ids]


def listen_connections() -> int:
    import psycopg2

    from models.db import get_engine

    conn = psycopg2.connect(harness.ADMIN_URL)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND query LIKE 'LISTEN%%'",
                        (get_engine().url.database,))
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--waiters", type=int, default=200, help="concurrent waiters (one job each) per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sim-latency", type=float, default=0.2, help="seconds per simulator call")
    p.add_argument("--out", type=Path, help="also write the report to this file")
    args = p.parse_args(argv)
    when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    with T.bench_stack(args.sim_latency, [1001]) as stack:
        import celeryconfig

        stack.worker(harness.WorkerProcess(stack.env, concurrency=celeryconfig.worker_concurrency)).start()
        from tasks.outcome_listener import listener

        latencies: list[float] = []
        rounds = []
        for r in range(args.rounds):
            started = time.monotonic()
            lat, info = one_round(stack.conns[1001], 1001, args.waiters, 3_000_000 + r * args.waiters)
            latencies += lat
            rounds.append({"round": r + 1, "seconds": round(time.monotonic() - started, 1), "p50_ms":
                           round(T.percentile(lat, 50), 1), "p99_ms": round(T.percentile(lat, 99), 1), **info})
        lst = listener()
        report = {
            "when": when, "waiters": args.waiters, "rounds": args.rounds, "sim_latency_s": args.sim_latency,
            "samples": len(latencies), "p50_ms": round(T.percentile(latencies, 50), 1),
            "p90_ms": round(T.percentile(latencies, 90), 1), "p99_ms": round(T.percentile(latencies, 99), 1),
            "max_ms": round(max(latencies), 1) if latencies else None,
            "listener": {"connects": lst.connects, "notifications": lst.notifications,
                         "peak_waiters": lst.peak_waiters},
            "per_round": rounds,
        }
        lst.stop()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
