"""Set-up operations behind the CLI (and the demo): connections, preferences, sessions."""
from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from models import AccountSettings, AiSession, PsaConnection
from models import crypto
from providers import REGISTRY
from providers.netguard import UnsafeUrlError, check_base_url
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
    try:
        # https, a public address (or one the operator allows), no metadata host: the same
        # rules the worker applies again whenever it opens a connection (DNS can change).
        base_url = check_base_url(base_url)
    except UnsafeUrlError as err:
        raise RequestError(err.message, field="base_url") from None
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
    connection = PsaConnection(account_id=account.account_id, provider=provider, base_url=base_url,
                               company_id=company_id, client_id=client_id,
                               public_key_encrypted=b"", private_key_encrypted=b"")
    db.add(connection)
    db.flush()  # the id the keys are bound to; same transaction, so no row commits without its keys
    bind = dict(conn_id=connection.id, base_url=connection.base_url, provider=provider)
    connection.public_key_encrypted = crypto.encrypt_bound(public_key, **bind)
    connection.private_key_encrypted = crypto.encrypt_bound(private_key, **bind)
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
    connection = db.get(PsaConnection, conn_id) if conn_id is not None else None
    if conn_id is not None and connection is None:
        raise NotFoundError(f"unknown PSA connection {conn_id}", field="psa_connection_id")
    if connection is not None and connection.account_id != account.account_id:
        # Enqueue would refuse it later; a session must never even point at another tenant's PSA.
        raise RequestError(f"PSA connection {conn_id} belongs to another account", field="psa_connection_id")
    ticket = v.positive_int(psa_ticket_id, "psa_ticket_id") if psa_ticket_id is not None else None
    session = AiSession(account_id=account.account_id, psa_connection_id=conn_id, psa_ticket_id=ticket, title=title)
    db.add(session)
    db.flush()
    return session


def options_from(preferences: dict[str, Any] | None, provider: str | None) -> dict[str, Any]:
    """The account preferences that tune its provider (the provider's `option_keys`: tenant
    picklist overrides, email on notes...); none for providers without any. The claim reads
    the preferences with the job, so a job pays no query of its own for them."""
    keys = getattr(REGISTRY.get(provider or ""), "option_keys", ())
    prefs = preferences or {}
    return {k: prefs[k] for k in keys if k in prefs}
