"""Human output of `jobs show`: a header block, then one timeline of everything that
happened to the job (created, each attempt, operator actions, alerts, finished)."""
from __future__ import annotations

import datetime as dt
from typing import Any

from worker.cli_format import table
from worker.safetext import one_line


def _when(iso: str | None) -> str:
    if not iso:
        return "-"
    return dt.datetime.fromisoformat(iso).astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _status(pair: list[Any]) -> str:
    sid, name = pair
    return "-" if sid is None else (f"{sid} ({name})" if name else str(sid))


def _took(ms: int | None) -> str:
    if ms is None:
        return "-"
    return f"{ms} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"


def header(s: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("account", str(s["account_id"])),
            ("ticket", f'{s["provider"]} #{s["ticket_id"]} (connection {s["psa_connection_id"]})'
             if s["ticket_id"] else "none (no PSA linked)"),
            ("session", str(s["session_id"])),
            ("attempts", f'{s["attempts"]} of {s["max_attempts"]}')]
    if s["note_state"] != "none" or s["note_external_id"]:
        note = f'{s["note_state"]}' + (f', id {s["note_external_id"]}' if s["note_external_id"] else "")
        rows.append(("note", note + (" (adopted: found on the ticket, not posted twice)" if s["note_adopted"] else "")))
    if s["target_status_id"] is not None or s["expected_status"][0] is not None:
        verdict = "verified " + _when(s["verified_at"]) if s["verified_at"] else "not verified"
        rows.append(("status", f'expected {_status(s["expected_status"])}, observed {_status(s["observed_status"])}'
                               f'{", patched" if s["status_patched"] else ""}; {verdict}'))
    if s["status_transition_skipped_reason"]:
        rows.append(("status", "not changed: " + s["status_transition_skipped_reason"]))
    rows += [("created", _when(s["created_at"])), ("finished", _when(s["finished_at"]))]
    if s["state"] in ("queued", "retrying"):
        rows.append(("next attempt", _when(s["next_attempt_at"])))
    if s["error_message"]:
        rows.append(("error", f'{s["error_type"]}: {s["error_message"]}'))
    return rows


def timeline(s: dict[str, Any]) -> list[list[str]]:
    events: list[tuple[str, int, list[str]]] = [(s["created_at"] or "", 0, ["created", "-", "-", "-", "-",
                                                                            f'{s["kind"]} enqueued'])]
    for a in s["attempt_history"]:
        detail = a["error_message"] or ""
        if detail and a["error_type"] not in (None, "error"):
            detail = f'{a["error_type"]}: {detail}'
        task = f'task {a["celery_task_id"][:8]}' if a["celery_task_id"] else ""
        where = f'at {a["step"]}' if a["step"] else ""
        events.append((a["started_at"] or "", 1, ["attempt", str(a["attempt_no"]), a["outcome"],
                                                  _took(a["duration_ms"]) + (f' (PSA {_took(a["psa_ms"])})'
                                                                             if a.get("psa_ms") is not None else ""),
                                                  str(a["http_status"] or "-"),
                                                  " ".join(x for x in (where, detail, f"({task})" if task else "") if x)]))
    for act in s["operator_actions"]:
        events.append((act["at"] or "", 2, [act["action"], "-", f'{act["from_state"]}→{act["to_state"]}', "-", "-",
                                            f'by {act["actor"]}: {act["message"]}']))
    for al in s["alerts"]:
        resolved = f', resolved: {al["resolution"]}' if al["resolved_at"] else ""
        events.append((al["created_at"] or "", 3, ["alert", "-", al["kind"], "-", str(al["delivery_status_code"] or "-"),
                                                   f'alert {al["id"]}, webhook {al["delivery_state"]}{resolved}']))
    if s["finished_at"]:
        events.append((s["finished_at"], 4, ["finished", "-", s["state"], "-", "-",
                                             (s["result"] or {}).get("outcome") or ""]))
    return [[_when(t)] + row for t, _, row in sorted(events, key=lambda e: (_instant(e[0]), e[1]))]


def _instant(iso: str) -> dt.datetime:
    if not iso:
        return dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    return dt.datetime.fromisoformat(iso)


def render_story(s: dict[str, Any]) -> str:
    lines = [f'job {s["id"]} · {s["kind"]} · {s["state"]}']
    lines += [f"  {k:<13}{one_line(v)}" for k, v in header(s)]  # vendor strings: no raw control characters
    lines += ["", "timeline (UTC)"]
    lines.append(table(["time", "event", "#", "outcome", "took", "http", "detail"], timeline(s)))
    return "\n".join(lines)
