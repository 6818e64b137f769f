"""`psa-writeback jobs ...`: list and show jobs with their attempt timeline."""
from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import Any

from sqlalchemy import select

from models import WritebackAttempt, WritebackJob
from models.db import session_scope


def add_parser(sub: argparse._SubParsersAction) -> None:
    jobs = sub.add_parser("jobs", help="inspect writeback jobs")
    jsub = jobs.add_subparsers(dest="jobs_cmd", required=True)
    ls = jsub.add_parser("list", help="list jobs, newest first")
    ls.add_argument("--state", help="only jobs in this state (queued, running, retrying, succeeded, ...)")
    ls.add_argument("--account", type=int, help="only this account's jobs")
    ls.add_argument("--ticket", type=int, help="only jobs for this PSA ticket id")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_list)
    show = jsub.add_parser("show", help="one job with its attempts")
    show.add_argument("job_id", type=int)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)


def job_dict(job: WritebackJob) -> dict[str, Any]:
    return {
        "id": job.id, "kind": job.kind, "state": job.state, "session_id": job.session_id,
        "account_id": job.account_id, "provider": job.provider, "psa_connection_id": job.psa_connection_id,
        "ticket_id": job.ticket_id, "target_status_id": job.target_status_id,
        "attempts": job.attempts, "max_attempts": job.max_attempts,
        "next_attempt_at": _iso(job.next_attempt_at), "created_at": _iso(job.created_at),
        "finished_at": _iso(job.finished_at), "note_external_id": job.note_external_id,
        "expected_status": [job.expected_status_id, job.expected_status_name],
        "observed_status": [job.observed_status_id, job.observed_status_name],
        "status_transition_skipped_reason": job.transition_skipped_reason,
        "error_type": job.error_type, "error_message": job.error_message, "result": job.result,
    }


def attempt_dict(a: WritebackAttempt) -> dict[str, Any]:
    return {"attempt_no": a.attempt_no, "started_at": _iso(a.started_at), "duration_ms": a.duration_ms,
            "outcome": a.outcome, "step": a.step, "http_status": a.http_status, "error_type": a.error_type,
            "error_message": a.error_message, "celery_task_id": a.celery_task_id, "worker": a.worker}


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def cmd_list(args: argparse.Namespace) -> int:
    q = select(WritebackJob).order_by(WritebackJob.id.desc()).limit(args.limit)
    if args.state:
        q = q.where(WritebackJob.state == args.state)
    if args.account:
        q = q.where(WritebackJob.account_id == args.account)
    if args.ticket:
        q = q.where(WritebackJob.ticket_id == args.ticket)
    with session_scope() as db:
        rows = [job_dict(j) for j in db.scalars(q)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(table(["id", "kind", "state", "account", "ticket", "attempts", "created", "error"],
                [[r["id"], r["kind"], r["state"], r["account_id"], r["ticket_id"] or "-",
                  f'{r["attempts"]}/{r["max_attempts"]}', (r["created_at"] or "")[:19],
                  (r["error_message"] or "")[:60]] for r in rows]))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with session_scope() as db:
        job = db.get(WritebackJob, args.job_id)
        if job is None:
            print(f"error: no job {args.job_id}")
            return 2
        data = job_dict(job)
        data["attempt_history"] = [attempt_dict(a) for a in db.scalars(
            select(WritebackAttempt).where(WritebackAttempt.job_id == job.id).order_by(WritebackAttempt.attempt_no))]
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for key in ("id", "kind", "state", "session_id", "account_id", "provider", "ticket_id", "target_status_id",
                "attempts", "created_at", "finished_at", "note_external_id", "expected_status", "observed_status",
                "status_transition_skipped_reason", "error_message"):
        print(f"{key:>32}: {data[key]}")
    print()
    print(table(["#", "started", "ms", "outcome", "step", "http", "error"],
                [[a["attempt_no"], (a["started_at"] or "")[:19], a["duration_ms"], a["outcome"], a["step"] or "-",
                  a["http_status"] or "-", (a["error_message"] or "")[:70]] for a in data["attempt_history"]]))
    return 0


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) if c is not None else "-" for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])
