"""`psa-writeback`: set up, enqueue, inspect, and run the demo.

Secrets never go on the command line (where `ps` and shell history would keep them): PSA
keys are read from environment variables (worker.cli_connections).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from models.crypto import ConfigurationError
from tasks.errors import RequestError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RequestError as err:
        _fail(args, err.message, err.code)
        return 2
    except ConfigurationError as err:
        _fail(args, str(err), "configuration")
        return 2


def _fail(args: argparse.Namespace, message: str, code: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps({"error": code, "message": message}))
    else:
        print(f"error: {message}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    from worker import cli_alerts, cli_connections, cli_jobs

    p = argparse.ArgumentParser(prog="psa-writeback", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    sub.add_parser("migrate", help="create or upgrade the database schema").set_defaults(func=cmd_migrate)
    sub.add_parser("generate-key", help="print a new encryption key for PSA_WRITEBACK_ENCRYPTION_KEYS") \
        .set_defaults(func=lambda a: print(__import__("models.crypto", fromlist=["x"]).generate_key()))

    rk = sub.add_parser("rotate-keys", help="re-encrypt every stored PSA key with the first key of "
                                             "PSA_WRITEBACK_ENCRYPTION_KEYS (and bind legacy keys)")
    rk.add_argument("--json", action="store_true")
    rk.set_defaults(func=cmd_rotate_keys)

    cli_connections.add_parsers(sub)  # add-connection, check-connection, simulator

    s = sub.add_parser("set-prefs", help="set account preferences, e.g. cw_resolved_status_id=9")
    s.add_argument("--account", type=int, required=True)
    s.add_argument("pairs", nargs="+", metavar="KEY=VALUE", help="VALUE is JSON if it parses, else a string; "
                                                                  "an empty VALUE removes the key")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_set_prefs)

    cs = sub.add_parser("create-session", help="create a troubleshooting session (for trials and the demo)")
    cs.add_argument("--account", type=int, required=True)
    cs.add_argument("--connection", type=int)
    cs.add_argument("--ticket", type=int)
    cs.add_argument("--title", default="")
    cs.add_argument("--json", action="store_true")
    cs.set_defaults(func=cmd_create_session)

    e = sub.add_parser("enqueue", help="enqueue a writeback job")
    esub = e.add_subparsers(dest="kind", required=True)
    for name in ("resolve", "escalate", "post-note", "transition"):
        k = esub.add_parser(name)
        k.add_argument("--session", type=int, required=True)
        if name != "transition":
            src = k.add_mutually_exclusive_group(required=True)
            src.add_argument("--markdown", help="the note text")
            src.add_argument("--markdown-file", type=Path, help="read the note text from a file ('-' = stdin)")
        if name == "post-note":
            k.add_argument("--visibility", required=True, choices=["resolution", "internal", "discussion"])
        if name == "transition":
            k.add_argument("--status-id", type=int, required=True)
        k.add_argument("--idempotency-key")
        k.add_argument("--json", action="store_true")
        k.set_defaults(func=cmd_enqueue)

    cli_jobs.add_parser(sub)
    cli_alerts.add_parser(sub)

    d = sub.add_parser("demo", help="run the whole flow against the simulator and print the outcomes")
    d.add_argument("--keep", action="store_true", help="keep the demo database instead of starting fresh")
    d.set_defaults(func=lambda a: __import__("worker.demo", fromlist=["run"]).run(keep=a.keep))

    return p


def _out(args: argparse.Namespace, data: dict[str, Any], human: str) -> int:
    print(json.dumps(data) if getattr(args, "json", False) else human)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from models.db import database_url
    from models.migrate import upgrade

    upgrade()
    url = database_url()
    print(f"database is at the latest schema ({url.split('@')[-1]})")
    return 0


def cmd_rotate_keys(args: argparse.Namespace) -> int:
    from tasks.keys import rotate_keys

    report = rotate_keys()
    lines = [f"rotated {len(report.rotated)} connection(s) ({len(report.bound)} bound to their connection), "
             f"{len(report.current)} already current, {len(report.failed)} failed"]
    lines += [f"  connection {cid}: {why}" for cid, why in report.failed]
    _out(args, report.as_dict(), "\n".join(lines))
    return 1 if report.failed else 0  # an old key may only be removed once nothing failed


def cmd_set_prefs(args: argparse.Namespace) -> int:
    from models.db import session_scope
    from tasks import admin

    updates: dict[str, Any] = {}
    for pair in args.pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise RequestError(f"expected KEY=VALUE, got {pair!r}")
        try:
            updates[key] = json.loads(raw) if raw else None
        except ValueError:
            updates[key] = raw
    with session_scope() as db:
        prefs = admin.set_preferences(db, args.account, updates)
    return _out(args, {"account_id": args.account, "preferences": prefs}, json.dumps(prefs, indent=2))


def cmd_create_session(args: argparse.Namespace) -> int:
    from models.db import session_scope
    from tasks import admin

    with session_scope() as db:
        s = admin.create_session(db, account_id=args.account, psa_connection_id=args.connection,
                                 psa_ticket_id=args.ticket, title=args.title)
        sid = s.id
    return _out(args, {"session_id": sid}, f"session {sid} created")


def cmd_enqueue(args: argparse.Namespace) -> int:
    from tasks import enqueue

    intent: dict[str, Any] = {"session_id": args.session, "idempotency_key": args.idempotency_key}
    if args.kind != "transition":
        if args.markdown_file is not None:
            raw = sys.stdin.buffer.read() if str(args.markdown_file) == "-" else _read(args.markdown_file)
            intent["markdown"] = raw  # bytes: validation reports non-UTF-8 clearly
        else:
            intent["markdown"] = args.markdown
    if args.kind == "post-note":
        intent["visibility"] = args.visibility
    if args.kind == "transition":
        intent["status_id"] = args.status_id
    kind = {"post-note": "post_note", "transition": "transition_status"}.get(args.kind, args.kind)
    job_id = enqueue(None, kind, **intent)
    return _out(args, {"job_id": job_id}, f"job {job_id} enqueued ({kind})")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise RequestError(f"cannot read {path}: {err.strerror}", field="markdown_file") from None


if __name__ == "__main__":
    sys.exit(main())
