"""Set-up operations behind the CLI (and the demo): connections, preferences, sessions."""
from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from sqlalchemy.orm import Session

from models import AccountSettings, AiSession, PsaConnection
from models import crypto
from providers import REGISTRY
from tasks import validation as v
from tasks.errors import NotFoundError, RequestError


def ensure_account(db: Session, account_id: Any, name: str = "") -> AccountSettings:
    account_id = v.positive_int(account_id, "account_id")
    account = db.get(AccountSettings, account_id)
    if account is None:
        account = AccountSettings(account_id=account_id, name=name, preferences={})
        db.add(account)
        db.flush()
    return account


def add_connection(db: Session, *, account_id: Any, provider: str, base_url: str, company_id: str, client_id: str,
                   public_key: str, private_key: str) -> PsaConnection:
    if provider not in REGISTRY:
        raise RequestError(f"unknown provider {provider!r}; known: {', '.join(sorted(REGISTRY))}", field="provider")
    parsed = urlparse(base_url or "")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise RequestError(f"base_url must be an http(s) URL, got {base_url!r}", field="base_url")
    # Credential columns are shared by every provider; some leave one empty (Autotask's
    # company_id is only the zone's name, Halo has no public key): the provider says which.
    optional = getattr(REGISTRY[provider], "optional_credentials", ())
    for field, value in (("company_id", company_id), ("client_id", client_id), ("public_key", public_key),
                         ("private_key", private_key)):
        if not isinstance(value, str):
            raise RequestError(f"{field} must be a string", field=field)
        if not value.strip() and field not in optional:
            raise RequestError(f"{field} is required for {provider}", field=field)
    account = ensure_account(db, account_id)
    connection = PsaConnection(account_id=account.account_id, provider=provider, base_url=base_url.rstrip("/"),
                               company_id=company_id, client_id=client_id,
                               public_key_encrypted=crypto.encrypt(public_key),
                               private_key_encrypted=crypto.encrypt(private_key))
    db.add(connection)
    db.flush()
    return connection


def set_preferences(db: Session, account_id: Any, updates: dict[str, Any]) -> dict[str, Any]:
    """Merge `updates` into the account's preferences; a None value removes the key."""
    account = ensure_account(db, account_id)
    prefs = dict(account.preferences or {})
    for key, value in updates.items():
        if value is None:
            prefs.pop(key, None)
        else:
            prefs[key] = value
    account.preferences = prefs
    db.flush()
    return prefs


def create_session(db: Session, *, account_id: Any, psa_connection_id: Any = None, psa_ticket_id: Any = None,
                   title: str = "") -> AiSession:
    account = ensure_account(db, account_id)
    conn_id = v.positive_int(psa_connection_id, "psa_connection_id") if psa_connection_id is not None else None
    if conn_id is not None and db.get(PsaConnection, conn_id) is None:
        raise NotFoundError(f"unknown PSA connection {conn_id}", field="psa_connection_id")
    ticket = v.positive_int(psa_ticket_id, "psa_ticket_id") if psa_ticket_id is not None else None
    session = AiSession(account_id=account.account_id, psa_connection_id=conn_id, psa_ticket_id=ticket, title=title)
    db.add(session)
    db.flush()
    return session


def provider_options(account_id: int, provider: str | None) -> dict[str, Any]:
    """The account's preferences that tune its provider (the provider's `option_keys`),
    read in one short transaction; none (and no query) for providers without any."""
    keys = getattr(REGISTRY.get(provider or ""), "option_keys", ())
    if not keys:
        return {}
    from models.db import session_scope

    with session_scope() as db:
        account = db.get(AccountSettings, account_id)
        prefs = dict(account.preferences or {}) if account is not None else {}
    return {k: prefs[k] for k in keys if k in prefs}
