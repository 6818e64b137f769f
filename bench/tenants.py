"""Per-tenant state vs tenants (issue 14, figure 1). Not part of CI.

    .venv/bin/python -m bench.tenants [--sizes 10,1000,5000] [--jobs-per-connection 2]
                                      [--jobs-small 2000] [--latency 0] [--out FILE]

N active PSA connections, each its own tenant (account) with its own base URL on one
ConnectWise simulator process (`http://127.0.0.1:<port>/t<n>/v4_6_release/apis/3.0`: the
simulator serves any `.../apis/3.0` prefix, and the worker sees distinct hosts' worth of
sessions, credentials and limiter keys). For each size: the jobs are enqueued first, then a
fresh worker with the shipped defaults (threads, WORKER_CONCURRENCY, in-flight cap 8) runs
them. Reported per size: jobs/s (first start to last finish), the worker's RSS at the end
and its peak, its open fds and sockets (peak while running and at the end; TCP sockets to the
simulator counted separately), and the run's Redis limiter keys with and without an expiry.
Every size is bounded by --max-seconds; the run stops by itself.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import throughput as T  # noqa: E402
from tests import harness  # noqa: E402


def add_tenants(base: str, first_account: int, n: int) -> list[tuple[int, int]]:
    """n accounts, one ConnectWise connection each at its own base URL: [(account, connection id)]."""
    from models.db import session_scope
    from tasks import admin

    root, _, suffix = base.partition("/v4_6_release")
    made = []
    for lo in range(0, n, 250):
        with session_scope() as db:
            for account in range(first_account + lo, first_account + min(n, lo + 250)):
                conn = admin.add_connection(db, account_id=account, provider="connectwise",
                                            base_url=f"{root}/t{account}/v4_6_release{suffix}", company_id="simco",
                                            client_id="00000000-0000-0000-0000-00000000c11e",
                                            public_key="fake-public", private_key="fake-private")
                admin.set_preferences(db, account, {"cw_resolved_status_id": 9, "cw_escalated_status_id": 7})
                made.append((account, conn.id))
    return made


def make_sessions(tenants: list[tuple[int, int]], per: int, first_ticket: int) -> list[int]:
    """`per` sessions per tenant, interleaved (tenant 1, 2, ..., n, 1, 2, ...) like a busy day."""
    from sqlalchemy import insert

    from models import AiSession
    from models.db import session_scope

    rows = [{"account_id": a, "psa_connection_id": c, "psa_ticket_id": first_ticket + i * len(tenants) + k,
             "title": "bench"} for i in range(per) for k, (a, c) in enumerate(tenants)]
    ids: list[int] = []
    for lo in range(0, len(rows), 2000):
        with session_scope() as db:
            ids += db.execute(insert(AiSession).returning(AiSession.id), rows[lo:lo + 2000]).scalars().all()
    return ids


def proc_figures(pid: int, sim_port: int) -> dict:
    """RSS now and peak (MB), open fds, sockets, TCP sockets to the simulator (established)."""
    status = {line.split(":")[0]: line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
              if line.startswith(("VmRSS:", "VmHWM:", "Threads:"))}
    fds, inodes = harness.socket_inodes(pid)
    to_sim = harness.established_to(sim_port, pid)
    return {"rss_mb": int(status["VmRSS"]) / 1024, "rss_peak_mb": int(status["VmHWM"]) / 1024,
            "threads": int(status["Threads"]), "fds": fds, "sockets": len(inodes), "psa_sockets": to_sim}


class Sampler(threading.Thread):
    """The worker's figures every `every` seconds; keeps the peaks."""

    def __init__(self, pid: int, sim_port: int, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.port, self.every = pid, sim_port, every
        self.peak: dict[str, float] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.every):
            try:
                now = proc_figures(self.pid, self.port)
            except (OSError, KeyError):
                return
            for key, value in now.items():
                self.peak[key] = max(self.peak.get(key, 0), value)


def limiter_keys() -> dict:
    import redis

    client = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])
    keys = list(client.scan_iter(match=os.environ["CELERY_REDIS_KEY_PREFIX"] + "psa-writeback:*", count=1000))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.pttl(key)
    ttls = pipe.execute()
    return {"keys": len(keys), "without_expiry": sum(1 for t in ttls if t == -1),
            "longest_expiry_s": max([t for t in ttls if t > 0], default=0) / 1000}


def run_size(stack: T.BenchStack, n: int, per: int, first_account: int, first_ticket: int, max_seconds: float) -> dict:
    sim_port = int(stack.base.split(":")[2].split("/")[0])
    t0 = time.monotonic()
    tenants = add_tenants(stack.base, first_account, n)
    sessions = make_sessions(tenants, per, first_ticket)
    setup_s = time.monotonic() - t0
    ids = T.enqueue_many(sessions)
    worker = stack.worker(harness.WorkerProcess(stack.env, concurrency=None))  # shipped WORKER_CONCURRENCY
    worker.start(timeout=60)
    idle = proc_figures(worker.proc.pid, sim_port)
    sampler = Sampler(worker.proc.pid, sim_port)
    sampler.start()
    try:
        rows = T.wait_jobs(ids, max_seconds)
    finally:
        sampler.halt.set()
        sampler.join()
    end = proc_figures(worker.proc.pid, sim_port)
    keys_end = limiter_keys()
    worker.stop(timeout=60)
    stack.workers.remove(worker)
    finished = [r for r in rows if r.finished_at]
    span = (max(r.finished_at for r in finished) - min(r.started_at for r in finished)).total_seconds() \
        if finished else float("nan")
    states: dict[str, int] = {}
    for r in rows:
        states[r.state] = states.get(r.state, 0) + 1
    return {"connections": n, "jobs": len(ids), "done": len(finished), "states": states, "seconds": span,
            "jobs_per_s": len(finished) / span if finished else 0.0, "setup_s": setup_s, "worker_idle": idle,
            "worker_peak": sampler.peak, "worker_end": end, "redis_limiter_keys_at_end": keys_end}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10,1000,5000")
    p.add_argument("--jobs-per-connection", type=int, default=2)
    p.add_argument("--jobs-small", type=int, default=2000, help="total jobs for sizes under 100 connections")
    p.add_argument("--latency", type=float, default=0.0, help="simulator seconds per call")
    p.add_argument("--max-seconds", type=float, default=300, help="per size: stop waiting after this")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    # the shipped in-flight cap (throughput.py lifts it to measure one tenant on every thread)
    os.environ.setdefault("PSA_MAX_INFLIGHT_PER_CONNECTION", "8")
    sizes = [int(s) for s in args.sizes.split(",")]
    report: dict = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                    "latency_s": args.latency, "sizes": []}
    with T.bench_stack(args.latency, [999]) as stack:
        import celeryconfig

        report["concurrency"] = celeryconfig.worker_concurrency
        report["settings"] = {k: os.environ.get(k) for k in ("PSA_HTTP_MAX_SESSIONS", "PSA_HTTP_IDLE_SECONDS",
                                                             "PSA_MAX_INFLIGHT_PER_CONNECTION", "PSA_HTTP_POOL_SIZE")}
        account, ticket = 10_000, 1_000_000
        for n in sizes:
            per = max(args.jobs_small // n, 1) if n < 100 else args.jobs_per_connection
            r = run_size(stack, n, per, account, ticket, args.max_seconds)
            report["sizes"].append(r)
            print(render_row(r), flush=True)
            account, ticket = account + n, ticket + n * per + 10
    base = report["sizes"][0]["jobs_per_s"]
    for r in report["sizes"]:
        r["jobs_per_s_vs_first"] = r["jobs_per_s"] / base if base else float("nan")
    text = render(report)
    T.emit(text, report, args.out)
    return 0


def render_row(r: dict) -> str:
    pk, end, k = r["worker_peak"], r["worker_end"], r["redis_limiter_keys_at_end"]
    return (f"{r['connections']:>6} conns {r['done']:>6}/{r['jobs']:<6} jobs {r['jobs_per_s']:7.1f} jobs/s  "
            f"RSS end {end['rss_mb']:6.1f} MB peak {end['rss_peak_mb']:6.1f} MB  fds peak {pk.get('fds', 0):4.0f} "
            f"end {end['fds']:4d}  sockets peak {pk.get('sockets', 0):4.0f} end {end['sockets']:4d}  "
            f"PSA sockets peak {pk.get('psa_sockets', 0):4.0f} end {end['psa_sockets']:4d}  "
            f"limiter keys {k['keys']} ({k['without_expiry']} without expiry)")


def render(report: dict) -> str:
    lines = [f"bench.tenants {report['when']}  cpus {report['cpus']}  threads {report['concurrency']}  "
             f"PSA latency {report['latency_s']:g} s  settings {report['settings']}"]
    for r in report["sizes"]:
        lines.append(render_row(r) + f"  ({r['jobs_per_s_vs_first']:.2f}x of the first size; states {r['states']})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
