"""What an alert says: one summary line (logs, `text`) and a Slack Block Kit message.

Slack incoming webhooks take `text` (notifications, and the fallback for clients without
blocks) and `blocks`; Microsoft Teams' and most chat tools' "Slack-compatible" endpoints
read `text`. So `text` alone names everything on-call needs: account, ticket, expected and
observed status, job id. No note markdown and no credential is ever part of an alert.

Vendor strings (status names, a PSA's error message) and the account's name are chosen
by a tenant, so they are never markup: in mrkdwn (and in `text`, which Teams reads as
markdown) each one is a code span, with `&`, `<`, `>` escaped, backticks replaced, control
characters shown as escapes and every URL scheme defanged (`https[:]//`), so neither
`<https://evil|re-auth here>`, `[re-auth here](https://evil)` nor a bare URL renders as a
link (`[re-auth here] (https[:]//evil)`). The error message goes in a plain_text block, defanged the same way.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from worker.safetext import one_line

TITLES = {
    "verification_failed": "Status change did not verify",
    "job_failed": "Writeback failed",
    "auth_failed": "PSA credentials rejected",
    "job_stuck": "Writeback job stuck",
    "long_deferral": "PSA connection paused for long",
}

Quote = Callable[[str], str]
_SCHEME = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*):(/{1,2}|\\\\)")  # https://, ftp:/, file:\\ ...
_MAILTO = re.compile(r"(?i)\b(mailto|tel|sms|javascript|data):")


def _plain(text: str) -> str:
    return text


def defang(text: str) -> str:
    """`https://evil` -> `https[:]//evil`, `[text](url)` -> `[text] (url)`: still readable,
    no longer a link to any reader, even one that ignores code spans."""
    return _MAILTO.sub(r"\1[:]", _SCHEME.sub(r"\1[:]\2", one_line(text))).replace("](", "] (")


def _escape(text: str) -> str:
    # Slack mrkdwn's control characters (also what it would read as <url|text> links).
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def code(text: str) -> str:
    """A tenant's string inside mrkdwn: a code span, so no markdown or link inside it renders."""
    return f"`{_escape(defang(text)).replace('`', chr(0x2035))}`"


def _get(source: Any, name: str) -> Any:
    return source.get(name) if isinstance(source, dict) else getattr(source, name, None)


def _status(source: Any, which: str, quote: Quote = _plain) -> str:
    sid, name = _get(source, f"{which}_status_id"), _get(source, f"{which}_status_name")
    if sid is None:
        return "n/a"
    return f"{sid} ({quote(name)})" if name else str(sid)


def _account(source: Any, account_name: str | None = None, quote: Quote = _plain) -> str:
    account_id = _get(source, "account_id")
    return f"{quote(account_name)} ({account_id})" if account_name else str(account_id if account_id is not None else "n/a")


def _ticket(source: Any) -> str:
    ticket = _get(source, "ticket_id")
    if ticket is None:
        return "n/a"
    provider = _get(source, "provider")
    return f"{provider} #{ticket}" if provider else f"#{ticket}"


def summary(source: Any, account_name: str | None = None, quote: Quote = one_line) -> str:
    """account 1 · ticket connectwise #5003 · expected 9 (Resolved) · observed 1 (New) · job 7
    (`quote` renders the tenant's strings: one line for a log, a code span for mrkdwn)."""
    parts = [f"account {_account(source, account_name, quote)}", f"ticket {_ticket(source)}",
             f"expected {_status(source, 'expected', quote)}", f"observed {_status(source, 'observed', quote)}",
             f"job {_get(source, 'job_id') or 'n/a'}"]
    if _get(source, "kind") == "auth_failed":
        parts.insert(2, f"connection {_get(source, 'connection_id')}")
    return " · ".join(parts)


def slack_message(alert: Any, account_name: str | None = None) -> dict[str, Any]:
    kind = _get(alert, "kind")
    title = TITLES.get(kind, kind)
    job_id = _get(alert, "job_id")
    # Values built here from ids and our own words; the tenant's strings are code spans.
    fields = [("Account", _account(alert, account_name, code)), ("Ticket", _escape(_ticket(alert))),
              ("Expected status", _status(alert, "expected", code)),
              ("Observed status", _status(alert, "observed", code)),
              ("Job", f"{job_id} ({_get(alert, 'job_kind') or 'n/a'})" if job_id else "n/a"),
              ("Alert", f"{_get(alert, 'id')} · {kind}")]
    if kind == "auth_failed":
        fields.append(("Connection", str(_get(alert, "connection_id"))))
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": f"PSA writeback: {title}"}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": f"*{k}*\n{v}"} for k, v in fields]},
    ]
    message = _get(alert, "message")
    if message:
        blocks.append({"type": "section", "text": {"type": "plain_text", "text": defang(message[:2900]),
                                                   "emoji": False}})
    if job_id:
        blocks.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": f"Inspect: `psa-writeback jobs show {job_id}`"}]})
    return {"text": f":rotating_light: {title}: {summary(alert, account_name, code)}", "blocks": blocks}
