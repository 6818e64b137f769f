"""`psa-writeback check-connection`: prove a connection's keys with read-only calls, list
the statuses that apply to it, and say whether the account's target statuses exist there.

Never writes to the PSA, never prints a key. A failure names its likely cause (keys,
company/zone/tenant, an unreachable host, a wrong base URL) rather than a stack trace.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from models import AccountSettings, PsaConnection
from models.db import session_scope
from providers import REGISTRY, provider_for
from providers import errors as E
from tasks import admin, store
from tasks import validation as v
from tasks.errors import NotFoundError, RequestError

TARGETS = ("resolved", "escalated")
# What "the keys" are, per provider, for the auth-failure message.
KEY_HINTS = {
    "connectwise": "company id, public/private key pair and clientId",
    "autotask": "API user name, secret and integration code, or the zone (base URL) of that user",
    "halo": "client id and secret, or the tenant",
}


def check_connection(connection_id: int, ticket_id: int | None = None, board_id: int | None = None) -> dict[str, Any]:
    with session_scope() as db:
        conn = db.get(PsaConnection, connection_id)
        if conn is None:
            raise NotFoundError(f"unknown PSA connection {connection_id}", field="connection_id")
        row = (conn.id, conn.is_active, conn.base_url, conn.company_id, conn.client_id,
               conn.public_key_encrypted, conn.private_key_encrypted)
        provider_name, account_id = conn.provider, conn.account_id
        account = db.get(AccountSettings, account_id)
        prefs = dict(account.preferences or {}) if account is not None else {}
    if provider_name not in REGISTRY:
        raise RequestError(f"connection {connection_id} uses unsupported provider {provider_name!r}")
    creds, setup_error = store.credentials_for(connection_id, row[0], True, *row[2:])
    report: dict[str, Any] = {"connection_id": connection_id, "provider": provider_name, "base_url": row[2],
                              "active": bool(row[1]), "ok": False, "cause": None, "message": None,
                              "ticket": None, "statuses": [], "targets": []}
    if creds is None:
        return {**report, "cause": "keys_unreadable", "message": setup_error}
    provider = provider_for(provider_name, creds, admin.options_from(prefs, provider_name))
    try:
        if ticket_id is not None:
            t = provider.get_ticket(ticket_id)
            report["ticket"] = {"id": t.id, "status_id": t.status_id, "status_name": t.status_name,
                                "board_id": t.board_id, "closed": t.closed}
            board_id = t.board_id if board_id is None else board_id
        if board_id is None:
            if provider_name == "connectwise":
                return {**report, "cause": "usage", "message": "ConnectWise statuses belong to a board: pass "
                        "--ticket N (its board) or --board N"}
            board_id = 0  # statuses are tenant-wide
        statuses = provider.list_statuses(board_id)
    except E.PsaError as err:
        return {**report, **_cause(err, provider_name, row[2], ticket_id)}
    report["statuses"] = [{"id": s.id, "name": s.name, "closed": s.closed, "inactive": s.inactive} for s in statuses]
    prefix = REGISTRY[provider_name].preference_prefix
    known = {s.id: s for s in statuses}
    report["targets"] = [_target(f"{prefix}_{kind}_status_id", prefs.get(f"{prefix}_{kind}_status_id"), known)
                         for kind in TARGETS]
    return {**report, "ok": True, "message": "the keys work"}


def _target(key: str, value: Any, known: dict[int, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"key": key, "value": value, "exists": False, "skipped": True}
    if value is None:
        return {**out, "reason": f"{key} is not set: the status change would be skipped"}
    if not v.is_status_id(value):
        return {**out, "reason": f"{key} is not a positive integer: the status change would be skipped"}
    status = known.get(value)
    if status is None:
        return {**out, "skipped": False, "reason": f"status {value} does not exist here: the status change would "
                "fail at the PSA"}
    if status.inactive:
        return {**out, "exists": True, "skipped": False, "reason": f"status {value} ({status.name}) is inactive"}
    return {**out, "exists": True, "skipped": False, "name": status.name, "reason": None}


def _cause(err: E.PsaError, provider: str, base_url: str, ticket_id: int | None) -> dict[str, str]:
    host = urlparse(base_url).hostname or base_url
    if isinstance(err, E.PsaAuthError):
        return {"cause": "auth", "message": f"the PSA rejected the credentials ({err}); check the "
                                            f"{KEY_HINTS.get(provider, 'keys')}"}
    if isinstance(err, E.PsaPermissionDenied):
        return {"cause": "permission", "message": f"the API user lacks a permission ({err})"}
    if isinstance(err, E.PsaNotFound):
        what = f"ticket {ticket_id} does not exist, or " if ticket_id is not None else ""
        return {"cause": "not_found", "message": f"{what}the base URL is wrong ({err})"}
    if isinstance(err, E.PsaUnreachable):
        return {"cause": "unreachable", "message": f"could not reach {host} ({err})"}
    return {"cause": err.kind, "message": str(err)}
