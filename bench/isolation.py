"""Slow tenant isolation (issue 14, figure 2). Not part of CI.

    .venv/bin/python -m bench.isolation [--others 50] [--rate 2] [--window 90] [--slow-jobs 2000]
                                        [--slow-latency 2] [--fast-latency 0.05]
                                        [--latencies 0,0.2,2] [--out FILE]

One ConnectWise simulator process serves every tenant by path (bench.tenants); tenant A's
path answers every call after --slow-latency seconds (the simulator's `path_latency`), the
--others tenants' after --fast-latency. Every worker runs the shipped defaults (threads,
WORKER_CONCURRENCY 32, PSA_MAX_INFLIGHT_PER_CONNECTION 8); only PSA_ALLOWED_HOSTS is set, so
loopback may be called. In one command:

1. capacity (--latencies; skipped when empty): for each latency, that many resolve jobs spread
   over the other tenants (so no connection's cap binds) are enqueued, then a fresh worker runs
   them: jobs/s from the first start to the last finish, against 32 / (5 calls x latency);
2. baseline: one worker; the other tenants enqueue --rate jobs/s in total (paced, round-robin
   over the tenants) for --window seconds: their enqueue-to-terminal p50 / p99 and throughput;
3. isolation: the same worker; A enqueues --slow-jobs resolves first, then the same paced load
   runs for the same window. The others' figures again; A's jobs finished per second during
   the window against its cap / (5 calls x --slow-latency), their p50 / p99, and how many of
   A's jobs were deferred (InflightCapReached) in how many claim/defer cycles.
The worker's CPU seconds are read from /proc for phases 2 and 3.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import cpu as CPU  # noqa: E402
from bench import tenants as TN  # noqa: E402
from bench import throughput as T  # noqa: E402
from tests import harness  # noqa: E402

CALLS = T.CALLS_PER_JOB
SHIPPED_CAP = 8  # tasks.ratelimit.max_inflight()'s default


def worker_env(env: dict[str, str]) -> dict[str, str]:
    """The shipped defaults: bench.throughput's setup lifts the in-flight cap (it measures one
    tenant on every thread); this bench measures the cap, so the worker gets the code's default."""
    env = dict(env)
    env.pop("PSA_MAX_INFLIGHT_PER_CONNECTION", None)
    env.pop("WORKER_CONCURRENCY", None)
    return env


def cpu_seconds(pid: int) -> float:
    return CPU.cpu_seconds([pid])  # user + system, from /proc


def job_rows(ids: list[int]) -> list:
    from sqlalchemy import select

    from models import WritebackJob as J
    from models.db import session_scope

    with session_scope() as db:
        return db.execute(select(J.id, J.state, J.created_at, J.started_at, J.finished_at)
                          .where(J.id.in_(ids))).all()


def latency_figures(rows: list) -> dict:
    done = [r for r in rows if r.finished_at]
    lat = [(r.finished_at - r.created_at).total_seconds() for r in done]
    states: dict[str, int] = {}
    for r in rows:
        states[r.state] = states.get(r.state, 0) + 1
    out = {"jobs": len(rows), "done": len(done), "states": states, "p50_s": T.percentile(lat, 50),
           "p99_s": T.percentile(lat, 99), "max_s": max(lat, default=float("nan"))}
    if done:
        span = (max(r.finished_at for r in done) - min(r.created_at for r in rows)).total_seconds()
        out["jobs_per_s"] = len(done) / span
    return out


def paced_others(tenants: list[tuple[int, int]], rate: float, seconds: float, first_ticket: int) -> list[int]:
    """rate x seconds resolves, one every 1/rate s, round-robin over the tenants."""
    from tasks import enqueue_resolve

    n = int(rate * seconds)
    per = -(-n // len(tenants))
    sessions = TN.make_sessions(tenants, per, first_ticket)[:n]  # interleaved: tenant 1, 2, ..., n, 1, ...
    ids, start = [], time.monotonic()
    for i, sid in enumerate(sessions):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        ids.append(enqueue_resolve(None, sid, f"Paced {sid}."))
    return ids


def capacity(stack: T.BenchStack, tenants: list[tuple[int, int]], latency: float, jobs: int,
             first_ticket: int) -> dict:
    T.sim_control(stack.root, "/_sim/config", {"latency": latency})
    ids = T.enqueue_many(TN.make_sessions(tenants, -(-jobs // len(tenants)), first_ticket)[:jobs])
    worker = stack.worker(harness.WorkerProcess(worker_env(stack.env), concurrency=None))
    worker.start(timeout=60)
    rows = T.wait_jobs(ids, 60 + jobs * CALLS * max(latency, 0.01))
    worker.stop(timeout=60)
    stack.workers.remove(worker)
    done = [r for r in rows if r.finished_at]
    span = (max(r.finished_at for r in done) - min(r.started_at for r in done)).total_seconds()
    import celeryconfig

    ideal = celeryconfig.worker_concurrency / (CALLS * latency) if latency else None
    return {"latency_s": latency, "jobs": jobs, "done": len(done), "seconds": span, "jobs_per_s": len(done) / span,
            "ideal_jobs_per_s": ideal, "ratio_to_ideal": (len(done) / span / ideal) if ideal else None}


def a_figures(a_ids: list[int], window_start: dt.datetime, window_end: dt.datetime) -> dict:
    from sqlalchemy import func, select

    from models import WritebackAttempt as A
    from models.db import session_scope

    rows = job_rows(a_ids)
    done = [r for r in rows if r.finished_at]
    in_window = [r for r in done if window_start <= r.finished_at <= window_end]
    out = latency_figures(rows)
    out["done_in_window"] = len(in_window)
    out["jobs_per_s_in_window"] = len(in_window) / (window_end - window_start).total_seconds()
    # per 10 s of the window: jobs finished (A must progress all along, not in bursts)
    buckets = [0] * int(-(-(window_end - window_start).total_seconds() // 10))
    for r in in_window:
        buckets[min(int((r.finished_at - window_start).total_seconds() // 10), len(buckets) - 1)] += 1
    out["done_per_10s"] = buckets
    with session_scope() as db:
        q = select(func.count(), func.count(func.distinct(A.job_id))).where(
            A.job_id.in_(a_ids), A.outcome == "deferred", A.error_type == "InflightCapReached")
        out["cap_deferrals"], out["jobs_deferred"] = db.execute(q).one()
        out["attempt_rows"] = db.scalar(select(func.count()).where(A.job_id.in_(a_ids)))
        out["other_deferrals"] = db.scalar(select(func.count()).where(
            A.job_id.in_(a_ids), A.outcome == "deferred", A.error_type != "InflightCapReached"))
        out["cap_deferrals_in_window"] = db.scalar(select(func.count()).where(
            A.job_id.in_(a_ids), A.outcome == "deferred", A.started_at.between(window_start, window_end)))
        ran = db.execute(select(A.started_at, A.finished_at, A.duration_ms, A.psa_ms).where(
            A.job_id.in_(a_ids), A.outcome != "deferred")).all()
    # Slots A held on average during the window (every attempt that was not deferred holds
    # one from about its start): its cap when A progresses at its cap, whatever a job takes.
    held = sum(max(0.0, (min(f or window_end, window_end) - max(s, window_start)).total_seconds())
               for s, f, _d, _p in ran)
    span = (window_end - window_start).total_seconds()
    out["slots_held_mean"] = held / span
    out["cap_deferrals_per_s_in_window"] = out["cap_deferrals_in_window"] / span
    whole = [(d / 1000, (p or 0) / 1000) for _s, f, d, p in ran if f and d is not None]
    out["job_s_p50"] = T.percentile([d for d, _ in whole], 50)
    out["job_s_p99"] = T.percentile([d for d, _ in whole], 99)
    out["job_psa_s_p50"] = T.percentile([p for _, p in whole], 50)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--others", type=int, default=50)
    p.add_argument("--rate", type=float, default=2.0, help="the others' jobs per second, in total")
    p.add_argument("--window", type=float, default=90.0, help="seconds of paced load per phase")
    p.add_argument("--slow-jobs", type=int, default=2000)
    p.add_argument("--slow-latency", type=float, default=2.0)
    p.add_argument("--fast-latency", type=float, default=0.05)
    p.add_argument("--latencies", default="0,0.2,2", help="capacity phase: PSA seconds per call ('' to skip)")
    p.add_argument("--capacity-seconds", type=float, default=40.0, help="about how long each capacity run takes")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    report: dict = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                    "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    with T.bench_stack(args.fast_latency, []) as stack:
        import celeryconfig
        from tasks import ratelimit

        env = worker_env(stack.env)
        os.environ.pop("PSA_MAX_INFLIGHT_PER_CONNECTION", None)
        report["threads"], report["cap"] = celeryconfig.worker_concurrency, ratelimit.max_inflight()
        assert report["cap"] == SHIPPED_CAP
        [a] = TN.add_tenants(stack.base, 20_000, 1)
        others = TN.add_tenants(stack.base, 20_001, args.others)
        ticket = 1_000_000

        # 1. capacity of one worker, by PSA latency (the cap does not bind: 50 connections)
        report["capacity"] = []
        for lat in [float(x) for x in args.latencies.split(",") if x.strip()]:
            ideal = celeryconfig.worker_concurrency / (CALLS * lat) if lat else 90.0
            # whole waves of 32 jobs, about --capacity-seconds long
            jobs = max(report["threads"] * 4, int(ideal * args.capacity_seconds) // report["threads"]
                       * report["threads"])
            r = capacity(stack, others, lat, jobs, ticket)
            ticket += jobs + 10
            report["capacity"].append(r)
            print(f"capacity at {lat:g} s per call: {r['jobs_per_s']:.1f} jobs/s", flush=True)

        # 2. and 3. one worker; A's path is slow from now on
        T.sim_control(stack.root, "/_sim/config", {"latency": args.fast_latency,
                                                    "path_latency": {f"/t{a[0]}/": args.slow_latency}})
        worker = stack.worker(harness.WorkerProcess(env, concurrency=None))
        worker.start(timeout=60)
        pid = worker.proc.pid
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        base_ids = paced_others(others, args.rate, args.window, ticket)
        ticket += len(base_ids) + 10
        T.wait_jobs(base_ids, 120)
        report["baseline"] = {**latency_figures(job_rows(base_ids)),
                              "worker_cpu_s_per_s": (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)}
        print(f"baseline: {report['baseline']}", flush=True)

        a_sessions = T.make_sessions(a[0], a[1], args.slow_jobs, ticket)
        ticket += args.slow_jobs + 10
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        a_ids = T.enqueue_many(a_sessions)
        enqueued_a_s = time.monotonic() - t0
        window_start = dt.datetime.now(dt.timezone.utc)
        cpu_w, t_w = cpu_seconds(pid), time.monotonic()
        iso_ids = paced_others(others, args.rate, args.window, ticket)
        window_end = dt.datetime.now(dt.timezone.utc)
        # the window alone: A's backlog waiting, without the claims of its enqueue burst
        window_cpu = (cpu_seconds(pid) - cpu_w) / (time.monotonic() - t_w)
        T.wait_jobs(iso_ids, 120)
        iso_rows = job_rows(iso_ids)
        report["isolation"] = {**latency_figures(iso_rows),
                               "worker_cpu_s_per_s": (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0),
                               "worker_cpu_s_per_s_window": window_cpu}
        # the others' latency per 10 s of the window, by enqueue time (the start has A's burst)
        buckets: list[list[float]] = [[] for _ in range(int(-(-args.window // 10)))]
        for r in iso_rows:
            if r.finished_at:
                k = min(int((r.created_at - window_start).total_seconds() // 10), len(buckets) - 1)
                buckets[max(k, 0)].append((r.finished_at - r.created_at).total_seconds())
        report["isolation"]["max_s_per_10s"] = [round(max(b), 2) if b else None for b in buckets]
        report["a"] = {**a_figures(a_ids, window_start, window_end), "enqueue_s": enqueued_a_s,
                       "cap_rate_jobs_per_s": report["cap"] / (CALLS * args.slow_latency)}
        worker.stop(timeout=90)
        stack.workers.remove(worker)
    text = render(report)
    T.emit(text, report, args.out)
    return 0


def render(r: dict) -> str:
    a, b, i, args = r["a"], r["baseline"], r["isolation"], r["args"]
    lines = [f"bench.isolation {r['when']}  cpus {r['cpus']}  threads {r['threads']}  "
             f"PSA_MAX_INFLIGHT_PER_CONNECTION {r['cap']}", ""]
    if r["capacity"]:
        lines.append("(1) one worker, jobs spread over the other tenants, by PSA latency per call:")
        for c in r["capacity"]:
            ideal = f" = {c['ratio_to_ideal']:.2f} x {c['ideal_jobs_per_s']:.1f}" if c["ideal_jobs_per_s"] else ""
            lines.append(f"      {c['latency_s'] * 1000:6.0f} ms: {c['jobs_per_s']:6.1f} jobs/s{ideal} "
                         f"({c['done']}/{c['jobs']} jobs in {c['seconds']:.1f} s)")
    lines += [
        f"(2) baseline: {args['others']} tenants ({args['fast_latency'] * 1000:.0f} ms PSAs), {args['rate']:g} jobs/s "
        f"paced for {args['window']:g} s: enqueue-to-terminal p50 {b['p50_s']:.2f} s, p99 {b['p99_s']:.2f} s, "
        f"max {b['max_s']:.2f} s; {b['jobs_per_s']:.2f} jobs/s; {b['done']}/{b['jobs']} done {b['states']}; "
        f"worker CPU {b['worker_cpu_s_per_s']:.2f} s/s",
        f"(3) with tenant A ({args['slow_latency']:g} s PSA) and {args['slow_jobs']} of its resolves enqueued first "
        f"({a['enqueue_s']:.1f} s to enqueue):",
        f"    others: p50 {i['p50_s']:.2f} s, p99 {i['p99_s']:.2f} s, max {i['max_s']:.2f} s [target p99 <= 2 s]; "
        f"{i['jobs_per_s']:.2f} jobs/s ({i['jobs_per_s'] / b['jobs_per_s']:.2f} x baseline); "
        f"{i['done']}/{i['jobs']} done {i['states']}; worker CPU {i['worker_cpu_s_per_s']:.2f} s/s from A's "
        f"enqueue on, {i.get('worker_cpu_s_per_s_window', float('nan')):.2f} s/s in the window",
        f"    others' max per 10 s of the window (by enqueue time): {i['max_s_per_10s']}",
        f"    A: {a['done_in_window']} jobs finished in the window = {a['jobs_per_s_in_window']:.2f} jobs/s "
        f"({a['jobs_per_s_in_window'] / a['cap_rate_jobs_per_s']:.2f} x its cap's {a['cap_rate_jobs_per_s']:.2f}); "
        f"per 10 s {a['done_per_10s']}",
        f"    A's finished jobs ({a['done']} of {a['jobs']}; the rest still queued behind the cap): "
        f"enqueue-to-terminal p50 {a['p50_s']:.1f} s, p99 {a['p99_s']:.1f} s; states {a['states']}; "
        f"at the cap's rate the whole backlog takes {a['jobs'] / a['cap_rate_jobs_per_s'] / 60:.0f} min",
        f"    A held {a['slots_held_mean']:.2f} of its {r['cap']} slots on average in the window; one job took "
        f"p50 {a['job_s_p50']:.2f} s (p99 {a['job_s_p99']:.2f} s), of which p50 {a['job_psa_s_p50']:.2f} s waiting on "
        f"its PSA",
        f"    A's deferrals (InflightCapReached): {a['cap_deferrals_per_s_in_window']:.1f} claim/defer cycles per "
        f"second in the window;",
        f"    in all (to the end of the run): {a['jobs_deferred']} jobs deferred, {a['cap_deferrals']} claim/defer "
        f"cycles ({a['cap_deferrals'] / max(a['done'], 1):.1f} per finished job; {a['attempt_rows']} attempt rows; "
        f"{a['other_deferrals']} other deferrals)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
