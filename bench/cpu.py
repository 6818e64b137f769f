"""CPU per job, by process: the reference worker against ours, zero simulator latency.
Not part of CI. Throughput on a shared 2-core machine swings by ±10 % between runs; CPU
seconds per job, read from /proc, move less and say where the time goes.

    .venv/bin/python -m bench.cpu [--jobs 2000] [--no-reference] [--profile FILE]

--profile records our worker with py-spy (pip install py-spy; --gil: only the thread
holding the GIL, which is what limits a threads-pool worker) in collapsed-stack form.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench import throughput as T
from tests import harness


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def pids_of(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def snapshot(worker_pid: int, sim_pid: int) -> dict[str, float]:
    return {"worker": cpu_seconds([worker_pid]), "simulator": cpu_seconds([sim_pid]),
            "postgresql": cpu_seconds(pids_of("postgres")), "redis": cpu_seconds(pids_of("redis-server"))}


def per_job(before: dict[str, float], after: dict[str, float], jobs: int) -> dict[str, float]:
    return {k: round((after[k] - before[k]) / jobs * 1000, 2) for k in before}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--profile", type=Path, help="py-spy collapsed stacks of our worker to this file")
    args = p.parse_args(argv)
    report: dict[str, dict] = {}
    with T.bench_stack(0.0, [1001]) as stack:
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
        worker = stack.worker(harness.WorkerProcess(env, concurrency=celeryconfig.worker_concurrency))
        started: dict = {}

        def start() -> None:
            worker.start()
            started["before"] = snapshot(worker.proc.pid, sim.pid)
            if args.profile:
                spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
                started["spy"] = subprocess.Popen([spy, "record", "--pid", str(worker.proc.pid), "--rate", "250",
                                                   "--format", "raw", "--gil", "--nonblocking", "-o",
                                                   str(args.profile)], stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.DEVNULL)

        r2 = T.ours(args.jobs, conns[1001], 1001, 2_000_000, start=start)
        after = snapshot(worker.proc.pid, sim.pid)
        if "spy" in started:
            started["spy"].send_signal(2)
            started["spy"].wait(60)
        report["ours"] = {"jobs_per_s": round(r2["jobs_per_s"], 1), "states": r2["states"],
                          "cpu_ms_per_job": per_job(started["before"], after, args.jobs)}
        if "reference" in report:
            report["ours"]["ratio_to_reference"] = round(r2["jobs_per_s"] / r1["jobs_per_s"], 2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
