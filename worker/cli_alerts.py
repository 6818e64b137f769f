"""`psa-writeback alerts ...` and `psa-writeback metrics`.

    alerts list     [--open] [--kind K] [--account N] [--ticket N] [--job N] [--json]
    alerts resolve  ALERT_ID [--note TEXT]
    alerts check    run the stuck-jobs check and the reconciler now (what beat runs every minute)
    metrics         serve the deployment-wide queue metrics (python -m worker.metrics)
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from sqlalchemy import select

from models import Alert
from models.db import session_scope
from worker.cli_format import alert_dict, table


def add_parser(sub: argparse._SubParsersAction) -> None:
    al = sub.add_parser("alerts", help="list and resolve alerts")
    asub = al.add_subparsers(dest="alerts_cmd", required=True)
    ls = asub.add_parser("list", help="alerts, newest first")
    ls.add_argument("--open", action="store_true", help="only alerts not resolved yet")
    ls.add_argument("--kind", help="verification_failed, job_failed, auth_failed, job_stuck or long_deferral")
    ls.add_argument("--account", type=int)
    ls.add_argument("--ticket", type=int)
    ls.add_argument("--job", type=int)
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    rs = asub.add_parser("resolve", help="mark an alert resolved")
    rs.add_argument("alert_id", type=int)
    rs.add_argument("--note", default="resolved by an operator")
    rs.add_argument("--json", action="store_true")
    rs.set_defaults(func=cmd_resolve)
    ck = asub.add_parser("check", help="run the stuck-jobs check and the alert reconciler once, now")
    ck.add_argument("--json", action="store_true")
    ck.set_defaults(func=cmd_check)
    m = sub.add_parser("metrics", help="serve deployment-wide queue metrics for Prometheus")
    m.add_argument("--port", type=int)
    m.add_argument("--addr")
    m.set_defaults(func=cmd_metrics)


def cmd_list(args: argparse.Namespace) -> int:
    q = select(Alert).order_by(Alert.id.desc()).limit(args.limit)
    for value, column in ((args.kind, Alert.kind), (args.account, Alert.account_id), (args.ticket, Alert.ticket_id),
                          (args.job, Alert.job_id)):
        if value is not None:
            q = q.where(column == value)
    if args.open:
        q = q.where(Alert.resolved_at.is_(None))
    with session_scope() as db:
        rows = [alert_dict(a) for a in db.scalars(q)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(table(["id", "kind", "created", "account", "ticket", "job", "expected", "observed", "webhook", "resolved"],
                [[r["id"], r["kind"], (r["created_at"] or "")[:19], r["account_id"], r["ticket_id"], r["job_id"],
                  _pair(r["expected_status"]), _pair(r["observed_status"]), r["delivery_state"],
                  (r["resolved_at"] or "")[:19] or "open"] for r in rows]))
    return 0


def _pair(pair: list[Any]) -> str:
    return "-" if pair[0] is None else f"{pair[0]} {pair[1] or ''}".strip()


def cmd_resolve(args: argparse.Namespace) -> int:
    from worker.alerts import resolve

    closed = resolve(alert_id=args.alert_id, resolution=args.note)
    message = f"alert {args.alert_id} resolved" if closed else f"alert {args.alert_id} is unknown or already resolved"
    print(json.dumps({"alert_id": args.alert_id, "resolved": bool(closed)}) if args.json else message)
    return 0 if closed else 1


def cmd_check(args: argparse.Namespace) -> int:
    from worker.alerts import run_checks

    counts = run_checks()
    print(json.dumps(counts) if args.json else ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from worker.metrics import main

    argv = (["--port", str(args.port)] if args.port else []) + (["--addr", args.addr] if args.addr else [])
    return main(argv)
