"""What an alert says: one summary line (logs, `text`) and a Slack Block Kit message.

Slack incoming webhooks take `text` (notifications, and the fallback for clients without
blocks) and `blocks`; Microsoft Teams' and most chat tools' "Slack-compatible" endpoints
read `text`. So `text` alone names everything on-call needs: account, ticket, expected and
observed status, job id. No note markdown and no credential is ever part of an alert.
"""
from __future__ import annotations

from typing import Any

TITLES = {
    "verification_failed": "Status change did not verify",
    "job_failed": "Writeback failed",
    "auth_failed": "PSA credentials rejected",
    "job_stuck": "Writeback job stuck",
    "long_deferral": "PSA connection paused for long",
}


def _get(source: Any, name: str) -> Any:
    return source.get(name) if isinstance(source, dict) else getattr(source, name, None)


def _status(source: Any, which: str) -> str:
    sid, name = _get(source, f"{which}_status_id"), _get(source, f"{which}_status_name")
    if sid is None:
        return "n/a"
    return f"{sid} ({name})" if name else str(sid)


def _account(source: Any, account_name: str | None = None) -> str:
    account_id = _get(source, "account_id")
    return f"{account_name} ({account_id})" if account_name else str(account_id if account_id is not None else "n/a")


def _ticket(source: Any) -> str:
    ticket = _get(source, "ticket_id")
    if ticket is None:
        return "n/a"
    provider = _get(source, "provider")
    return f"{provider} #{ticket}" if provider else f"#{ticket}"


def summary(source: Any, account_name: str | None = None) -> str:
    """account 1 · ticket connectwise #5003 · expected 9 (Resolved) · observed 1 (New) · job 7"""
    parts = [f"account {_account(source, account_name)}", f"ticket {_ticket(source)}",
             f"expected {_status(source, 'expected')}", f"observed {_status(source, 'observed')}",
             f"job {_get(source, 'job_id') or 'n/a'}"]
    if _get(source, "kind") == "auth_failed":
        parts.insert(2, f"connection {_get(source, 'connection_id')}")
    return " · ".join(parts)


def _escape(text: str) -> str:
    # Slack mrkdwn control characters; everything else is shown as is.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_message(alert: Any, account_name: str | None = None) -> dict[str, Any]:
    kind = _get(alert, "kind")
    title = TITLES.get(kind, kind)
    job_id = _get(alert, "job_id")
    fields = [("Account", _account(alert, account_name)), ("Ticket", _ticket(alert)),
              ("Expected status", _status(alert, "expected")), ("Observed status", _status(alert, "observed")),
              ("Job", f"{job_id} ({_get(alert, 'job_kind') or 'n/a'})" if job_id else "n/a"),
              ("Alert", f"{_get(alert, 'id')} · {kind}")]
    if kind == "auth_failed":
        fields.append(("Connection", str(_get(alert, "connection_id"))))
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": f"PSA writeback: {title}"}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": f"*{k}*\n{_escape(v)}"} for k, v in fields]},
    ]
    message = _get(alert, "message")
    if message:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _escape(message[:2900])}})
    if job_id:
        blocks.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": f"Inspect: `psa-writeback jobs show {job_id}`"}]})
    return {"text": _escape(f":rotating_light: {title}: {summary(alert, account_name)}"), "blocks": blocks}
