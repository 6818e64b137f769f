"""CPU per job, by process: the reference worker against ours (zero simulator latency unless --latency).
Not part of CI. Throughput on a shared 2-core machine swings by ±10 % between runs; CPU
seconds per job, read from /proc, move less and say where the time goes.

    .venv/bin/python -m bench.cpu [--jobs 2000] [--rounds 3] [--no-reference] [--no-by-name] [--latency S]
                                  [--profile FILE]

In each round three workers, one after the other, each on its own messages: the reference; ours on jobs
written by the enqueue API (`enqueue_resolve`, before the worker starts); ours on messages
sent by name with the intent (`send_task("writeback.resolve", kwargs={session_id, markdown,
idempotency_key})`, what a web tier that does not import this code sends), where the worker
writes the job row itself. Ours two alternate their order between rounds; the figures are
the rounds' means, and the by-name/API ratio is over all rounds (each round's is listed).

--profile records our workers with py-spy (the by-name one to FILE.by-name) (pip install py-spy; --gil: only the thread
holding the GIL, which is what limits a threads-pool worker) in collapsed-stack form.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import throughput as T
from tests import harness


def cpu_seconds(pids: list[int], user: bool = True, system: bool = True) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) * user + int(fields[12]) * system  # utime, stime: clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def pids_of(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def snapshot(worker_pid: int, sim_pid: int) -> dict[str, float]:
    return {"worker": cpu_seconds([worker_pid]), "worker_system": cpu_seconds([worker_pid], user=False),
            "simulator": cpu_seconds([sim_pid]),
            "postgresql": cpu_seconds(pids_of("postgres")), "redis": cpu_seconds(pids_of("redis-server"))}


def per_job(before: dict[str, float], after: dict[str, float], jobs: int) -> dict[str, float]:
    return {k: round((after[k] - before[k]) / jobs * 1000, 2) for k in before}


def attempts_by_outcome() -> dict[str, int]:
    """Attempt rows (executions) by outcome, in the whole database: a run's share is the
    difference across it. More executions than jobs (a deferral by our own rate limiter, a
    claim refused) is work a job's CPU figure includes."""
    from sqlalchemy import func, select

    from models import WritebackAttempt as A
    from models.db import session_scope

    with session_scope() as db:
        return dict(db.execute(select(A.outcome, func.count()).group_by(A.outcome)).all())


def _spy(pid: int, out: Path) -> subprocess.Popen:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--gil",
                             "--nonblocking", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_spy(spy: subprocess.Popen | None) -> None:
    if spy is not None:
        spy.send_signal(2)
        spy.wait(60)


def by_name(n: int, conn_id: int, account: int, first_ticket: int, start, timeout: float = 900) -> dict:
    """Ours on messages sent by name with the intent, all published before `start()` (the
    worker); the worker writes each job row itself."""
    from sqlalchemy import func, select

    from models import WritebackJob as J
    from models.db import session_scope
    from worker.app import app

    sessions = T.make_sessions(account, conn_id, n, first_ticket)
    for sid in sessions:
        app.send_task("writeback.resolve", kwargs={"session_id": sid, "markdown": f"Benchmark resolution {sid}.",
                                                   "idempotency_key": f"bench-by-name-{sid}"},
                      queue="writeback", kwargsrepr=f"{{'session_id': {sid}}}")
    start()
    deadline = time.monotonic() + timeout
    lo, hi = min(sessions), max(sessions)
    in_run = J.session_id.between(lo, hi)
    while True:
        with session_scope() as db:
            done = db.scalar(select(func.count()).where(in_run, J.finished_at.is_not(None)))
            if done >= n or time.monotonic() > deadline:
                rows = db.execute(select(J.state, J.started_at, J.finished_at).where(in_run)).all()
                break
        time.sleep(0.25)
    finished = [r for r in rows if r.finished_at]
    # From the first message taken (the job row's creation is part of the work measured).
    with session_scope() as db:
        first = db.scalar(select(func.min(J.created_at)).where(in_run))
    span = (max(r.finished_at for r in finished) - first).total_seconds()
    states: dict[str, int] = {}
    for r in rows:
        states[r.state] = states.get(r.state, 0) + 1
    return {"jobs": n, "done": len(finished), "states": states, "jobs_per_s": len(finished) / span}


def _measure(stack, run, profile: Path | None, latency: float) -> dict:
    """One of our workers, started fresh, on `run`'s messages: its figures."""
    import celeryconfig

    worker = stack.worker(harness.WorkerProcess(stack.env, concurrency=celeryconfig.worker_concurrency))
    marks: dict = {}

    def start() -> None:
        worker.start()
        marks["before"] = snapshot(worker.proc.pid, stack.sim.pid)
        if profile:
            marks["spy"] = _spy(worker.proc.pid, profile)

    executions = attempts_by_outcome()
    result = run(start)
    after = snapshot(worker.proc.pid, stack.sim.pid)
    _stop_spy(marks.get("spy"))
    worker.stop(timeout=30)
    executions = {k: v - executions.get(k, 0) for k, v in attempts_by_outcome().items()}
    figures = {"jobs_per_s": round(result["jobs_per_s"], 1), "states": result["states"],
               "cpu_ms_per_job": per_job(marks["before"], after, result["jobs"]),
               "executions": {k: v for k, v in executions.items() if v}}
    if latency > 0:
        bound = celeryconfig.worker_concurrency / (T.CALLS_PER_JOB * latency)
        figures["ratio_to_thread_bound"] = round(result["jobs_per_s"] / bound, 2)
    return figures


def _mean(runs: list[dict]) -> dict:
    """The rounds' figures of one side: CPU per job and jobs/s averaged, states and
    executions added up."""
    out: dict = {"jobs_per_s": round(sum(r["jobs_per_s"] for r in runs) / len(runs), 1)}
    out["cpu_ms_per_job"] = {k: round(sum(r["cpu_ms_per_job"][k] for r in runs) / len(runs), 2)
                             for k in runs[0]["cpu_ms_per_job"]}
    for key in ("states", "executions"):
        if key in runs[0]:
            total: dict[str, int] = {}
            for r in runs:
                for k, v in r[key].items():
                    total[k] = total.get(k, 0) + v
            out[key] = total
    if "ratio_to_thread_bound" in runs[0]:
        out["ratio_to_thread_bound"] = round(sum(r["ratio_to_thread_bound"] for r in runs) / len(runs), 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2000, help="jobs per worker run")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of (reference,) API path and by-name path, the two alternating in order "
                        "(ABBA...): the figures are their means, the ratio is over all rounds (one pair alone "
                        "gave the by-name/API ratio anywhere between 0.93 and 1.26 on the same code)")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--no-by-name", action="store_true", help="skip the by-name run")
    p.add_argument("--latency", type=float, default=0.0,
                   help="seconds the simulator adds to every call (then also: the ratio to the thread bound, "
                        "concurrency / (5 calls x latency))")
    p.add_argument("--profile", type=Path, help="py-spy collapsed stacks of our worker to this file (first round)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.jobs < 1:
        p.error("--rounds and --jobs must be at least 1")
    rounds: list[dict[str, dict]] = []
    with T.bench_stack(args.latency, [1001]) as stack:
        import celeryconfig

        sim, base, conns = stack.sim, stack.base, stack.conns
        for number in range(args.rounds):
            this: dict[str, dict] = {}
            tickets = 10_000_000 * (number + 1)  # each run its own tickets and sessions
            if not args.no_reference:
                ref = stack.worker(T.reference_worker(stack.env, celeryconfig.worker_concurrency))
                try:
                    ref.start()
                    before = snapshot(ref.proc.pid, sim.pid)
                    r1 = T.reference(args.jobs, base, tickets + 1_000_000)
                    this["reference"] = {"jobs_per_s": round(r1["jobs_per_s"], 1),
                                         "cpu_ms_per_job": per_job(before, snapshot(ref.proc.pid, sim.pid), args.jobs)}
                finally:
                    ref.stop(timeout=30)
            profile = args.profile if number == 0 else None
            sides = [("ours", lambda start, t=tickets: T.ours(args.jobs, conns[1001], 1001, t + 2_000_000,
                                                              start=start), profile)]
            if not args.no_by_name:
                sides.append(("ours_by_name", lambda start, t=tickets: by_name(args.jobs, conns[1001], 1001,
                                                                               t + 3_000_000, start=start),
                              profile and profile.with_name(profile.name + ".by-name")))
            for name, run, spy in (sides if number % 2 == 0 else sides[::-1]):
                this[name] = _measure(stack, run, spy, args.latency)
            rounds.append(this)
            print(f"round {number + 1}: " + ", ".join(f"{k} {v['cpu_ms_per_job']['worker']} ms/job"
                                                      for k, v in this.items()), file=sys.stderr, flush=True)
    report: dict[str, Any] = {name: _mean([r[name] for r in rounds]) for name in rounds[0]}
    if "reference" in report:
        for name in ("ours", "ours_by_name"):
            if name in report:
                report[name]["ratio_to_reference"] = round(
                    sum(r[name]["jobs_per_s"] for r in rounds) / sum(r["reference"]["jobs_per_s"] for r in rounds), 2)
    if "ours_by_name" in report:
        worker = [(r["ours_by_name"]["cpu_ms_per_job"]["worker"], r["ours"]["cpu_ms_per_job"]["worker"]) for r in rounds]
        report["ours_by_name"]["worker_cpu_vs_api_path"] = round(sum(b for b, _ in worker) / sum(a for _, a in worker), 2)
        report["ours_by_name"]["worker_cpu_vs_api_path_per_round"] = [round(b / a, 2) for b, a in worker]
    report["rounds"] = rounds
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
