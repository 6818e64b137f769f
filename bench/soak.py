"""Soak test: N writebacks while workers are SIGKILLed at random (issue 3). Not part of CI.

    .venv/bin/python -m bench.soak [--jobs 2000] [--rate 40] [--kill-every 1:4] [--chaos 0.0]

Starts what it needs: a fresh PostgreSQL database (TEST_DATABASE_ADMIN_URL, default the local
one), a private redis-server on a spare port, the ConnectWise simulator as its own process,
two workers (a threads pool and a prefork pool, running the production app plus a
job_finished recorder) and `celery beat` (the sweeper, as in the Procfile). It enqueues the
jobs at --rate per second through the enqueue API while a killer SIGKILLs, every few
seconds, either a whole worker (process group; restarted shortly after) or one prefork
pool child. Then it stops killing, waits for every job to reach a terminal state (or
--grace seconds), and reports:

  jobs, kills (group / child), lost jobs (not terminal at the end), duplicate notes,
  wrong statuses (verified on our side, different on the PSA), job_finished firings that
  are missing or repeated, and p50 / p90 / p99 / max seconds from enqueue to terminal state.

Exit status 0 only if nothing was lost or duplicated.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import harness  # noqa: E402  (no project imports before the environment is set)

SOAK_ENV = {
    **harness.TEST_ENV,
    "PSA_CONNECT_TIMEOUT": "1",
    "PSA_READ_TIMEOUT": "2",
    "POST_SETTLE_SECONDS": "2",
    "JOB_LEASE_SECONDS": "6",
    "SWEEP_INTERVAL_SECONDS": "1",
    "SWEEP_REPUBLISH_AFTER_SECONDS": "2",
    "RETRY_BASE_SECONDS": "0.2",
    "RETRY_MAX_DELAY_SECONDS": "2",
    "VERIFY_INTERVAL_SECONDS": "0.05",
    "CELERY_VISIBILITY_TIMEOUT": "30",
    "DB_POOL_SIZE": "20",
}
RESOLVED, ESCALATED = 9, 7


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=40.0, help="jobs enqueued per second")
    parser.add_argument("--kill-every", default="1:4", help="seconds between kills, uniform MIN:MAX")
    parser.add_argument("--chaos", type=float, default=0.0, help="share of PSA calls that fail (5xx/429/drop/slow)")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds the simulator adds to every call")
    parser.add_argument("--threads", type=int, default=16, help="concurrency of the threads worker")
    parser.add_argument("--grace", type=float, default=180.0, help="seconds to wait after the last kill")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the report here as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the database and logs")
    args = parser.parse_args(argv)
    kill_min, kill_max = (float(x) for x in args.kill_every.split(":"))
    rng = random.Random(args.seed)

    run_dir = Path(f"/tmp/pswb-soak-{os.getpid()}")
    run_dir.mkdir(parents=True, exist_ok=True)
    database_url = harness.create_database()
    broker = harness.RedisServer().start()
    sim_proc, sim_url = _start_simulator(args.latency, run_dir)
    env = {**os.environ, **SOAK_ENV, "DATABASE_URL": database_url, "CELERY_BROKER_URL": broker.url,
           "WRITEBACK_EVENT_LOG": str(run_dir / "events.jsonl")}
    env.pop("CELERY_REDIS_KEY_PREFIX", None)
    os.environ.update({k: v for k, v in env.items() if k in SOAK_ENV or k in ("DATABASE_URL", "CELERY_BROKER_URL")})
    os.environ.pop("CELERY_REDIS_KEY_PREFIX", None)

    from models.migrate import upgrade

    upgrade(database_url)
    workers: dict[str, harness.WorkerProcess] = {}
    beat = None
    try:
        if args.chaos:
            _sim(sim_url, "/_sim/faults", {"action": "chaos", "operation": "any", "times": -1, "rate": args.chaos,
                                           "seconds": 2.5})
        account = _world(sim_url)
        specs = {"threads": dict(pool="threads", concurrency=args.threads), "prefork": dict(pool="prefork",
                                                                                            concurrency=2)}

        def start(name: str) -> None:
            workers[name] = harness.WorkerProcess(env, app="tests.chaos.eventsink", log_path=run_dir /
                                                  f"{name}-{time.time():.0f}.log", **specs[name]).start(timeout=60)

        for name in specs:
            start(name)
        beat = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker", "beat", "-l", "WARNING", "-s",
                                 str(run_dir / "beat-schedule")], cwd=ROOT, env=env,
                                stdout=open(run_dir / "beat.log", "ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)

        kills: Counter = Counter()
        stop_killing = threading.Event()
        killer = threading.Thread(target=_killer, args=(workers, start, kills, stop_killing, rng, kill_min, kill_max),
                                  daemon=True)
        started = time.monotonic()
        killer.start()
        job_ids = _enqueue_all(account, args.jobs, args.rate)
        enqueued_in = time.monotonic() - started
        # keep killing until the backlog is nearly done, then let the rest finish in peace
        _wait(lambda: _unfinished(job_ids) <= args.jobs // 50, timeout=args.grace + args.jobs / args.rate)
        stop_killing.set()
        killer.join()
        for name in specs:  # a worker killed last may still be down
            if not workers[name].alive():
                start(name)
        _wait(lambda: _unfinished(job_ids) == 0, timeout=args.grace)
        elapsed = time.monotonic() - started
        report = _report(job_ids, sim_url, run_dir, kills, elapsed, enqueued_in, args)
    finally:
        for w in workers.values():
            w.stop(timeout=15)
        if beat is not None and beat.poll() is None:
            os.killpg(beat.pid, signal.SIGTERM)
            beat.wait(15)
        sim_proc.terminate()
        broker.stop()
        from models.db import get_engine

        get_engine().dispose()
        if not args.keep:
            harness.drop_database(database_url)
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"logs: {run_dir}", file=sys.stderr)
    return 0 if report["lost"] == 0 and report["duplicate_notes"] == 0 and report["wrong_status"] == 0 else 1


def _start_simulator(latency: float, run_dir: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "providers.simulators.connectwise", "--auto-tickets",
                             "--latency", str(latency)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=open(run_dir / "simulator.log", "ab"))
    line = json.loads(proc.stdout.readline())
    return proc, line["root_url"]


def _sim(root: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(root + path, data=data, method="POST" if body is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _world(sim_url: str) -> tuple[int, int]:
    from models.db import session_scope
    from tasks import admin

    with session_scope() as db:
        conn = admin.add_connection(db, account_id=1, provider="connectwise",
                                    base_url=sim_url + "/v4_6_release/apis/3.0", company_id="simco",
                                    client_id="00000000-0000-0000-0000-00000000c11e", public_key="fake-public",
                                    private_key="fake-private")
        admin.set_preferences(db, 1, {"cw_resolved_status_id": RESOLVED, "cw_escalated_status_id": ESCALATED})
        return 1, conn.id


def _enqueue_all(account: tuple[int, int], n: int, rate: float) -> list[int]:
    from models.db import session_scope
    from tasks import admin, enqueue_escalate, enqueue_resolve, enqueue_transition

    account_id, conn_id = account
    ids, t0 = [], time.monotonic()
    for i in range(n):
        ticket = 100_000 + i
        with session_scope() as db:
            sid = admin.create_session(db, account_id=account_id, psa_connection_id=conn_id, psa_ticket_id=ticket,
                                       title=f"soak {i}").id
        kind = i % 3
        if kind == 0:
            ids.append(enqueue_resolve(None, sid, f"Soak {i}: replaced the toner.", max_attempts=20))
        elif kind == 1:
            ids.append(enqueue_escalate(None, sid, f"## Problem\nSoak {i}.", max_attempts=20))
        else:
            ids.append(enqueue_transition(None, sid, RESOLVED, max_attempts=20))
        ahead = t0 + (i + 1) / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    return ids


def _killer(workers, start, kills: Counter, stop: threading.Event, rng: random.Random, lo: float, hi: float) -> None:
    while not stop.wait(rng.uniform(lo, hi)):
        name = rng.choice(sorted(workers))
        w = workers[name]
        if not w.alive():
            continue
        if name == "prefork" and rng.random() < 0.5 and w.children():
            try:
                w.kill_child()
                kills["child"] += 1
            except (ProcessLookupError, ValueError):
                pass
            continue
        w.kill_group()
        kills["group"] += 1
        time.sleep(rng.uniform(0.5, 2.0))  # the supervisor's restart delay
        start(name)


def _unfinished(job_ids: list[int]) -> int:
    from sqlalchemy import func, select

    from models import WritebackJob
    from models.db import session_scope
    from models.enums import TERMINAL_STATES

    with session_scope() as db:
        return db.scalar(select(func.count()).select_from(WritebackJob).where(
            WritebackJob.id.in_(job_ids), WritebackJob.state.notin_([s.value for s in TERMINAL_STATES])))


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(1.0)
    return False


def _report(job_ids: list[int], sim_url: str, run_dir: Path, kills: Counter, elapsed: float, enqueued_in: float,
            args: argparse.Namespace) -> dict:
    from sqlalchemy import func, select

    from models import WritebackAttempt, WritebackJob
    from models.db import session_scope

    with session_scope() as db:
        jobs = list(db.scalars(select(WritebackJob).where(WritebackJob.id.in_(job_ids))))
        outcomes = Counter(dict(db.execute(select(WritebackAttempt.outcome, func.count())
                                           .group_by(WritebackAttempt.outcome)).all()))
    states = Counter(j.state for j in jobs)
    terminal = [j for j in jobs if j.finished_at is not None]
    latencies = sorted((j.finished_at - j.created_at).total_seconds() for j in terminal)
    duplicates = wrong_status = 0
    for j in jobs:
        try:
            ticket = _sim(sim_url, f"/_sim/tickets/{j.ticket_id}")
        except urllib.error.HTTPError:  # never touched: no notes, status unknown
            ticket = {"notes": [], "status_id": None}
        expected_notes = 1 if j.markdown is not None else 0
        duplicates += max(0, len(ticket["notes"]) - expected_notes)
        if j.result and j.result.get("outcome") == "verified" and ticket["status_id"] != j.expected_status_id:
            wrong_status += 1
    fired = Counter()
    log = run_dir / "events.jsonl"
    if log.exists():
        fired = Counter(json.loads(line)["job_id"] for line in log.read_text().splitlines()
                        if '"job_finished"' in line)

    def pct(p: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 2) if latencies else None

    return {
        "command": "python -m bench.soak " + " ".join(sys.argv[1:]),
        "jobs": len(job_ids),
        "kills": sum(kills.values()), "kills_group": kills["group"], "kills_child": kills["child"],
        "lost": len(jobs) - len(terminal) + (len(job_ids) - len(jobs)),
        "duplicate_notes": duplicates,
        "wrong_status": wrong_status,
        "states": dict(states),
        "attempt_outcomes": dict(outcomes),
        # A kill between the terminal COMMIT and the in-process emit loses the event (at most
        # once); the ops check (writeback.check_stuck) reconciles the alerts it would raise.
        "job_finished_missing": sum(1 for j in terminal if fired[j.id] == 0),
        "job_finished_repeated": sum(1 for j in terminal if fired[j.id] > 1),
        "seconds_to_terminal": {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99),
                                "max": round(latencies[-1], 2) if latencies else None,
                                "mean": round(statistics.fmean(latencies), 2) if latencies else None},
        "wall_seconds": round(elapsed, 1), "enqueue_seconds": round(enqueued_in, 1),
        "settings": {"rate": args.rate, "kill_every": args.kill_every, "chaos": args.chaos,
                     "latency": args.latency, "threads": args.threads, **{k: SOAK_ENV[k] for k in (
                         "JOB_LEASE_SECONDS", "PSA_READ_TIMEOUT", "SWEEP_INTERVAL_SECONDS")}},
    }


if __name__ == "__main__":
    sys.exit(main())
