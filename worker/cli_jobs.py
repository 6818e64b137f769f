"""`psa-writeback jobs ...`: find jobs, read one job's whole story, and repair jobs.

    jobs list    [--state failed,retrying] [--kind K] [--account N] [--ticket N] [--older-than 2h] [--newer-than 1d]
    jobs show    JOB_ID... | --ticket N         (attempt timeline, operator actions, alerts)
    jobs retry   JOB_ID... | filters --yes      (failed → queued, fresh attempt budget)
    jobs reverify JOB_ID... | filters --yes     (re-read the ticket; verified if it now shows the status)
    jobs cancel  JOB_ID... | filters --yes      (queued/retrying → cancelled)

Every command takes --json. Repairs print one progress line per job on stderr as they go.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from models import Alert, JobAction, WritebackAttempt, WritebackJob, utcnow
from models.db import session_scope
from tasks.errors import RequestError
from worker.cli_format import alert_dict, table
from worker.cli_format import iso as _iso
from worker.cli_render import render_story
from worker.safetext import one_line

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_REPAIR_STATES = {"retry": ["failed"], "reverify": ["verification_failed"], "cancel": ["queued", "retrying"]}


def duration(text: str) -> dt.timedelta:
    m = _DURATION.match(text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 90s, 15m, 2h, 3d)")
    return dt.timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


def _filters(p: argparse.ArgumentParser, *, state: bool) -> None:
    if state:
        p.add_argument("--state", help="comma-separated states: queued, running, retrying, succeeded, "
                                       "verification_failed, failed, cancelled")
    p.add_argument("--kind", help="resolve, escalate, post_note or transition_status")
    p.add_argument("--account", type=int, help="only this account's jobs")
    p.add_argument("--ticket", type=int, help="only jobs for this PSA ticket id")
    p.add_argument("--older-than", type=duration, metavar="AGE", help="created at least AGE ago (90s, 15m, 2h, 3d)")
    p.add_argument("--newer-than", type=duration, metavar="AGE", help="created at most AGE ago")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def add_parser(sub: argparse._SubParsersAction) -> None:
    jobs = sub.add_parser("jobs", help="inspect and repair writeback jobs")
    jsub = jobs.add_subparsers(dest="jobs_cmd", required=True)
    ls = jsub.add_parser("list", help="list jobs, newest first")
    _filters(ls, state=True)
    ls.set_defaults(func=cmd_list)
    show = jsub.add_parser("show", help="jobs with their attempt timeline, operator actions and alerts")
    show.add_argument("job_ids", type=int, nargs="*", metavar="JOB_ID")
    show.add_argument("--ticket", type=int, help="every job on this PSA ticket, newest first")
    show.add_argument("--limit", type=int, default=10)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)
    for name, help_ in (("retry", "re-queue failed jobs with a fresh attempt budget"),
                        ("reverify", "re-read the ticket of verification_failed jobs; verified if it now matches"),
                        ("cancel", "cancel queued or retrying jobs")):
        r = jsub.add_parser(name, help=help_)
        r.add_argument("job_ids", type=int, nargs="*", metavar="JOB_ID")
        _filters(r, state=False)
        r.add_argument("--yes", action="store_true", help="required when selecting jobs by filters")
        r.add_argument("--actor", help="who is doing this (default: $PSA_WRITEBACK_ACTOR or your user name)")
        if name in ("retry", "reverify"):
            r.add_argument("--max-attempts", type=int, help="attempt budget to give back (default RETRY_MAX_ATTEMPTS)")
        if name == "reverify":
            r.add_argument("--reapply", action="store_true", help="if the ticket still disagrees, re-queue the "
                                                                  "job to PATCH and verify again (no new note)")
        if name == "cancel":
            r.add_argument("--reason", default="")
        r.set_defaults(func=cmd_repair, action=name)


def job_dict(job: WritebackJob) -> dict[str, Any]:
    return {
        "id": job.id, "kind": job.kind, "state": job.state, "session_id": job.session_id,
        "account_id": job.account_id, "provider": job.provider, "psa_connection_id": job.psa_connection_id,
        "ticket_id": job.ticket_id, "target_status_id": job.target_status_id,
        "attempts": job.attempts, "max_attempts": job.max_attempts,
        "next_attempt_at": _iso(job.next_attempt_at), "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at), "finished_at": _iso(job.finished_at), "updated_at": _iso(job.updated_at),
        "note_state": job.note_state, "note_external_id": job.note_external_id, "note_adopted": job.note_adopted,
        "expected_status": [job.expected_status_id, job.expected_status_name],
        "observed_status": [job.observed_status_id, job.observed_status_name],
        "status_patched": job.status_patched, "verified_at": _iso(job.verified_at),
        "status_transition_skipped_reason": job.transition_skipped_reason,
        "error_type": job.error_type, "error_message": job.error_message, "result": job.result,
    }


def attempt_dict(a: WritebackAttempt) -> dict[str, Any]:
    return {"attempt_no": a.attempt_no, "started_at": _iso(a.started_at), "finished_at": _iso(a.finished_at),
            "duration_ms": a.duration_ms, "psa_ms": a.psa_ms, "outcome": a.outcome, "step": a.step,
            "http_status": a.http_status,
            "error_type": a.error_type, "error_message": a.error_message, "celery_task_id": a.celery_task_id,
            "worker": a.worker}


def action_dict(a: JobAction) -> dict[str, Any]:
    return {"action": a.action, "actor": a.actor, "at": _iso(a.at), "from_state": a.from_state,
            "to_state": a.to_state, "message": a.message}


def _select(args: argparse.Namespace, states: list[str] | None) -> Any:
    J, now = WritebackJob, utcnow()
    q = select(J).order_by(J.id.desc()).limit(args.limit)
    if states:
        q = q.where(J.state.in_(states))
    if args.kind:
        q = q.where(J.kind == args.kind)
    if args.account:
        q = q.where(J.account_id == args.account)
    if args.ticket:
        q = q.where(J.ticket_id == args.ticket)
    if args.older_than is not None:
        q = q.where(J.created_at <= now - args.older_than)
    if args.newer_than is not None:
        q = q.where(J.created_at >= now - args.newer_than)
    return q


def cmd_list(args: argparse.Namespace) -> int:
    states = [s.strip() for s in args.state.split(",") if s.strip()] if args.state else None
    with session_scope() as db:
        rows = [job_dict(j) for j in db.scalars(_select(args, states))]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    now = utcnow()
    print(table(["id", "kind", "state", "account", "ticket", "attempts", "age", "status exp→obs", "error"],
                [[r["id"], r["kind"], r["state"], r["account_id"], r["ticket_id"] or "-",
                  f'{r["attempts"]}/{r["max_attempts"]}', _age(now, r["created_at"]), _exp_obs(r),
                  (r["error_message"] or "")[:60]] for r in rows]))
    return 0


def _age(now: dt.datetime, iso: str | None) -> str:
    if not iso:
        return "-"
    seconds = (now - dt.datetime.fromisoformat(iso)).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _exp_obs(r: dict[str, Any]) -> str:
    exp, obs = r["expected_status"][0], r["observed_status"][0]
    return "-" if exp is None and obs is None else f"{exp}→{obs}"


def load_story(db: Any, job: WritebackJob) -> dict[str, Any]:
    data = job_dict(job)
    data["attempt_history"] = [attempt_dict(a) for a in db.scalars(
        select(WritebackAttempt).where(WritebackAttempt.job_id == job.id).order_by(WritebackAttempt.attempt_no))]
    data["operator_actions"] = [action_dict(a) for a in db.scalars(
        select(JobAction).where(JobAction.job_id == job.id).order_by(JobAction.at, JobAction.id))]
    data["alerts"] = [alert_dict(a) for a in db.scalars(select(Alert).where(Alert.job_id == job.id).order_by(Alert.id))]
    return data


def cmd_show(args: argparse.Namespace) -> int:
    if not args.job_ids and args.ticket is None:
        raise RequestError("give one or more job ids, or --ticket N")
    with session_scope() as db:
        if args.job_ids:
            jobs = [db.get(WritebackJob, i) for i in args.job_ids]
            missing = [i for i, j in zip(args.job_ids, jobs) if j is None]
            if missing:
                raise RequestError(f"no job {', '.join(map(str, missing))}", field="job_id")
        else:
            jobs = list(db.scalars(select(WritebackJob).where(WritebackJob.ticket_id == args.ticket)
                                   .order_by(WritebackJob.id.desc()).limit(args.limit)))
            if not jobs:
                raise RequestError(f"no jobs for ticket {args.ticket}", field="ticket")
        stories = [load_story(db, j) for j in jobs]
    if args.json:
        print(json.dumps(stories if len(stories) > 1 or args.ticket is not None else stories[0], indent=2))
        return 0
    print("\n\n".join(render_story(s) for s in stories))
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    from tasks import repair

    ids = list(args.job_ids)
    if not ids:
        if not any(getattr(args, f) is not None for f in ("kind", "account", "ticket", "older_than", "newer_than")):
            raise RequestError("give job ids, or filters (--account, --ticket, --older-than, ...) with --yes")
        with session_scope() as db:
            ids = [j.id for j in db.scalars(_select(args, _REPAIR_STATES[args.action]).limit(args.limit + 1))]
        if len(ids) > args.limit:  # never act on part of what the filters name and call it done
            raise RequestError(f"more than {args.limit} jobs match these filters: narrow them, or raise --limit",
                               field="limit")
        if not args.yes:
            print(f"would {args.action} {len(ids)} job(s): {', '.join(map(str, ids)) or '-'}; "
                  "add --yes to go ahead", file=sys.stderr)
            return 1
    ops: dict[str, Callable[[int], repair.RepairResult]] = {
        "retry": lambda i: repair.retry(i, actor=args.actor, budget=args.max_attempts),
        "reverify": lambda i: repair.reverify(i, actor=args.actor, reapply=args.reapply, budget=args.max_attempts),
        "cancel": lambda i: repair.cancel(i, actor=args.actor, reason=args.reason),
    }
    results = []
    for n, job_id in enumerate(ids, 1):
        result = ops[args.action](job_id)
        results.append(result)
        mark = "ok" if result.ok else "not done"
        print(f"[{n}/{len(ids)}] job {job_id}: {args.action} {mark} ({result.state}): {one_line(result.message)}",
              file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        done = sum(r.ok for r in results)
        print(f"{args.action}: {done} of {len(results)} job(s) done" +
              ("" if done == len(results) else f"; not done: {', '.join(str(r.job_id) for r in results if not r.ok)}"))
    return 0 if all(r.ok for r in results) else 1
