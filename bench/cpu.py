"""CPU per job, by process: the reference worker against ours (zero simulator latency unless --latency).
Not part of CI. Throughput on a shared 2-core machine swings by ±10 % between runs; CPU
seconds per job, read from /proc, move less and say where the time goes.

    .venv/bin/python -m bench.cpu [--jobs 2000] [--no-reference] [--no-by-name] [--latency S] [--profile FILE]

Three workers, one after the other, each on its own messages: the reference; ours on jobs
written by the enqueue API (`enqueue_resolve`, before the worker starts); ours on messages
sent by name with the intent (`send_task("writeback.resolve", kwargs={session_id, markdown,
idempotency_key})`, what a web tier that does not import this code sends), where the worker
writes the job row itself.

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--no-by-name", action="store_true", help="skip the by-name run")
    p.add_argument("--latency", type=float, default=0.0,
                   help="seconds the simulator adds to every call (then also: the ratio to the thread bound, "
                        "concurrency / (5 calls x latency))")
    p.add_argument("--profile", type=Path, help="py-spy collapsed stacks of our worker to this file")
    args = p.parse_args(argv)
    report: dict[str, dict] = {}
    with T.bench_stack(args.latency, [1001]) as stack:
        import celeryconfig

        env, sim, base, conns = stack.env, stack.sim, stack.base, stack.conns
        if not args.no_reference:
            ref = stack.worker(T.reference_worker(env, celeryconfig.worker_concurrency))
            try:
                ref.start()
                before = snapshot(ref.proc.pid, sim.pid)
                r1 = T.reference(args.jobs, base, 1_000_000)
                report["reference"] = {"jobs_per_s": round(r1["jobs_per_s"], 1),
                                       "cpu_ms_per_job": per_job(before, snapshot(ref.proc.pid, sim.pid), args.jobs)}
            finally:
                ref.stop(timeout=30)
        runs = [("ours", lambda start: T.ours(args.jobs, conns[1001], 1001, 2_000_000, start=start), args.profile)]
        if not args.no_by_name:
            runs.append(("ours_by_name", lambda start: by_name(args.jobs, conns[1001], 1001, 3_000_000, start=start),
                         args.profile and args.profile.with_name(args.profile.name + ".by-name")))
        for name, run, profile in runs:
            worker = stack.worker(harness.WorkerProcess(env, concurrency=celeryconfig.worker_concurrency))
            marks: dict = {}

            def start(worker: harness.WorkerProcess = worker, marks: dict = marks, profile: Path | None = profile) -> None:
                worker.start()
                marks["before"] = snapshot(worker.proc.pid, sim.pid)
                if profile:
                    marks["spy"] = _spy(worker.proc.pid, profile)

            result = run(start)
            after = snapshot(worker.proc.pid, sim.pid)
            _stop_spy(marks.get("spy"))
            worker.stop(timeout=30)
            report[name] = {"jobs_per_s": round(result["jobs_per_s"], 1), "states": result["states"],
                            "cpu_ms_per_job": per_job(marks["before"], after, args.jobs)}
            if args.latency > 0:
                bound = celeryconfig.worker_concurrency / (T.CALLS_PER_JOB * args.latency)
                report[name]["ratio_to_thread_bound"] = round(result["jobs_per_s"] / bound, 2)
            if "reference" in report:
                report[name]["ratio_to_reference"] = round(result["jobs_per_s"] / report["reference"]["jobs_per_s"], 2)
        if "ours_by_name" in report:
            report["ours_by_name"]["worker_cpu_vs_api_path"] = round(
                report["ours_by_name"]["cpu_ms_per_job"]["worker"] / report["ours"]["cpu_ms_per_job"]["worker"], 2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
