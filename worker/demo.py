"""The demo: the whole flow against the ConnectWise simulator with a real worker process,
then one resolve on each other PSA's simulator (Autotask, HaloPSA).

With nothing configured it runs on an embedded default (a SQLite file and a filesystem
broker under ./var); with DATABASE_URL and CELERY_BROKER_URL set it uses those instead.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SCENARIOS = [
    # (label, kind, ticket options, fault, expected state, expected outcome)
    ("resolve that verifies", "resolve", {}, None, "succeeded", "verified"),
    ("escalate (internal note)", "escalate", {}, None, "succeeded", "verified"),
    ("silent status rejection", "resolve", {"reject_status_changes": True}, None, "verification_failed",
     "verification_failed"),
    ("503, 503, then success", "resolve", {}, {"action": "error", "status": 503, "operation": "post_note", "times": 2},
     "succeeded", "verified"),
    ("no PSA linked (local)", "resolve", None, None, "succeeded", "local"),
]
# One resolve on each other PSA's simulator: the same flow through the provider registry.
OTHER_PSAS = ("autotask", "halo")
MARKDOWN = {
    "resolve": "The shared printer lost its IP reservation after the router update.\n\n"
               "- Re-added the DHCP reservation\n- Printed a test page from two desks\n\nEverything prints again.",
    "escalate": "## Problem\nOutlook prompts for a password every hour.\n## What we've confirmed\nOnly on VPN.\n"
                "## What we've tried\nCleared cached credentials.\n## Current hypothesis\nModern auth blocked.\n"
                "## Suggested next steps\nCheck the conditional access policy.",
}


def _prepare_environment(keep: bool) -> Path:
    from models.db import private_dir

    var = private_dir(Path(os.environ.setdefault("PSA_WRITEBACK_VAR", "var")).resolve())
    if not os.environ.get("DATABASE_URL") and not keep:
        for suffix in ("", "-wal", "-shm"):
            (var / f"psa-writeback.db{suffix}").unlink(missing_ok=True)
    if not os.environ.get("CELERY_BROKER_URL"):
        shutil.rmtree(var / "broker", ignore_errors=True)
    if not os.environ.get("PSA_WRITEBACK_ENCRYPTION_KEYS"):
        from models.crypto import generate_key

        os.environ["PSA_WRITEBACK_ENCRYPTION_KEYS"] = generate_key()
        print("note: PSA_WRITEBACK_ENCRYPTION_KEYS not set; using a throwaway key for this demo")
    # The simulator listens on loopback, which the worker refuses for a tenant's PSA unless
    # the operator allows it (README "Security model").
    os.environ.setdefault("PSA_ALLOWED_HOSTS", "127.0.0.1,localhost,::1")
    # Short waits so the retries are visible in seconds, not the production minutes.
    for key, value in (("RETRY_BASE_SECONDS", "1"), ("RETRY_MAX_DELAY_SECONDS", "5"),
                       ("VERIFY_INTERVAL_SECONDS", "0.2"), ("SWEEP_INTERVAL_SECONDS", "2")):
        os.environ.setdefault(key, value)
    return var


def run(keep: bool = False) -> int:
    var = _prepare_environment(keep)
    from models.db import database_url, session_scope
    from models.migrate import upgrade
    from providers.simulators.connectwise import SimulatorServer
    from tasks import admin, enqueue

    url = database_url()
    broker = os.environ.get("CELERY_BROKER_URL") or "filesystem (embedded)"
    print(f"database: {url.split('@')[-1]}\nbroker:   {broker.split('@')[-1]}")
    upgrade()
    sim = SimulatorServer().start()
    st = sim.state
    print(f"ConnectWise simulator on {sim.base_url}")
    with session_scope() as db:
        account = admin.ensure_account(db, 4242, name="Demo MSP")
        conn = admin.add_connection(db, account_id=account.account_id, provider="connectwise", base_url=sim.base_url,
                                    company_id=st.company_id, client_id=st.client_id, public_key=st.public_key,
                                    private_key=st.private_key)
        admin.set_preferences(db, account.account_id, {"cw_resolved_status_id": 9, "cw_escalated_status_id": 7})
        conn_id = conn.id
    worker = _start_worker(var)
    others: list = []
    try:
        jobs = []
        for n, (label, kind, ticket, fault, *_expected) in enumerate(SCENARIOS):
            ticket_id = 48210 + n
            with session_scope() as db:
                if ticket is None:
                    session = admin.create_session(db, account_id=4242, title=label)
                else:
                    st.add_ticket(ticket_id, **ticket)
                    if fault:
                        st.add_fault(ticket_id=ticket_id, **fault)
                    session = admin.create_session(db, account_id=4242, psa_connection_id=conn_id,
                                                   psa_ticket_id=ticket_id, title=label)
                jobs.append(enqueue(db, kind, session_id=session.id, markdown=MARKDOWN[kind]))
        jobs += [_resolve_on(others, provider) for provider in OTHER_PSAS]
        rows = _wait(jobs, timeout=90)
    finally:
        _stop_worker(worker)
        sim.stop()
        for server in others:
            server.stop()
    return _report(rows, st)


def _resolve_on(servers: list, provider: str) -> int:
    """Start `provider`'s simulator, connect the demo account to it, enqueue one resolve."""
    from models.db import session_scope
    from providers import REGISTRY
    from providers.simulators.kits import KITS
    from tasks import admin, enqueue

    kit = KITS[provider]
    server = kit.start()
    servers.append(server)
    print(f"{provider} simulator on {server.base_url}")
    server.state.add_ticket(48300 + len(servers))
    with session_scope() as db:
        conn = admin.add_connection(db, account_id=4242, **kit.connection(server))
        admin.set_preferences(db, 4242, kit.prefs(REGISTRY[provider].preference_prefix))
        session = admin.create_session(db, account_id=4242, psa_connection_id=conn.id,
                                       psa_ticket_id=48300 + len(servers), title=f"resolve on {provider}")
        return enqueue(db, "resolve", session_id=session.id, markdown=MARKDOWN["resolve"])


def _start_worker(var: Path) -> subprocess.Popen[bytes]:
    log = open(var / "demo-worker.log", "wb")
    cmd = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-P", "threads", "-c", "4", "-Q", "writeback",
           "-l", "INFO", "--without-gossip", "--without-mingle", "-n", "demo@%h"]
    print(f"starting worker: celery -A worker worker -P threads -c 4 (log: {log.name})")
    return subprocess.Popen(cmd, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)


def _stop_worker(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _wait(job_ids: list[int], timeout: float) -> list:
    from models import TERMINAL_STATES, WritebackJob
    from models.db import session_scope

    deadline = time.monotonic() + timeout
    while True:
        with session_scope() as db:
            rows = [db.get(WritebackJob, j) for j in job_ids]
        if all(r.state in {s.value for s in TERMINAL_STATES} for r in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.3)


def _report(rows: list, st) -> int:
    from worker.cli_format import table

    lines, ok = [], True
    expected = SCENARIOS + [(f"resolve on {p}", "resolve", {}, None, "succeeded", "verified") for p in OTHER_PSAS]
    for (label, _kind, _t, _f, want_state, want_outcome), job in zip(expected, rows):
        outcome = (job.result or {}).get("outcome")
        good = job.state == want_state and outcome == want_outcome
        ok &= good
        status = "-" if job.expected_status_id is None else \
            f"{job.expected_status_id} {job.expected_status_name} -> {job.observed_status_id} {job.observed_status_name}"
        lines.append([label, job.id, job.state, outcome, job.attempts, job.note_external_id or "-", status,
                      "as expected" if good else f"EXPECTED {want_state}/{want_outcome}"])
    print()
    print(table(["scenario", "job", "state", "outcome", "attempts", "note", "status expected -> observed", "check"],
                lines))
    print(f"\nsimulator calls: {dict(st.calls)}")
    print("demo OK" if ok else "demo FAILED: see the check column and var/demo-worker.log")
    return 0 if ok else 1
