"""Fair scheduling across tenants (issue 6): a tenant's flood must not delay another
tenant's single Resolve. Real worker, Redis priorities, simulator with PSA-like latency."""
from __future__ import annotations

import time

from sqlalchemy import func, select, update

from models import JobKind, WritebackJob
from models.db import session_scope
from tasks import enqueue_resolve
from tasks.enqueue import FAIR_STEPS, FLOOD_PRIORITY, build_job, fair_priority
from tests.factories import World, wait_terminal
from tests.harness import wait_for


def test_an_accounts_priority_falls_with_its_live_backlog_and_finished_jobs_do_not_count(world):
    def priority() -> int:
        with session_scope() as db:
            return fair_priority(db, world.account_id)

    seen = {0: priority()}
    with session_scope() as db:
        for n in range(1, 66):
            build_job(db, JobKind.RESOLVE, session_id=world.session(20_000 + n), markdown=f"Job {n}.")
            if n in (8, 9, 64, 65):
                seen[n] = fair_priority(db, world.account_id)
    assert FAIR_STEPS[:2] == ((8, 0), (64, 3))
    assert seen == {0: 0, 8: 0, 9: 3, 64: 3, 65: 6}
    with session_scope() as db:  # the same 65 jobs, finished: a quiet tenant again
        db.execute(update(WritebackJob).values(state="succeeded"))
    assert priority() == 0
    assert FLOOD_PRIORITY > FAIR_STEPS[-1][1]


def test_one_tenants_flood_does_not_hold_up_another_tenants_single_resolve(db_clean, sim, worker):
    # given tenant A's 160 resolves queued at once, each taking ~1 s at the PSA (5 calls x 0.2 s)
    # on a worker of 8 threads: in one FIFO, a job enqueued after them would wait ~20 s
    a, b = World.create(sim, account_id=1), World.create(sim, account_id=2)
    a_sessions = [a.session(21_000 + i) for i in range(160)]
    b_session = b.session(22_000)
    sim.state.latency = 0.2
    with session_scope() as db:
        a_jobs = [enqueue_resolve(db, sid, f"Sweep {sid}.") for sid in a_sessions]
    wait_for(lambda: sim.state.calls["list_notes"] >= 8, timeout=10, message="A's jobs under way")
    # when tenant B enqueues one resolve
    started = time.monotonic()
    b_job = wait_terminal(enqueue_resolve(None, b_session, "Tenant B's one resolve."), timeout=30)
    b_seconds = time.monotonic() - started
    with session_scope() as db:
        a_done = db.scalar(select(func.count()).where(WritebackJob.id.in_(a_jobs),
                                                      WritebackJob.finished_at.is_not(None)))
    # then B is done within about two of A's jobs' time, while most of A's sweep still waits
    assert b_job.state == "succeeded" and b_job.result["outcome"] == "verified"
    assert b_seconds < 4.0, (b_seconds, a_done)
    assert a_done < 60, a_done
    # and A's sweep still completes, every job verified (the PSA speeds up to let it drain)
    sim.state.latency = 0.0
    for job_id in a_jobs:
        assert wait_terminal(job_id, timeout=60).state == "succeeded"
