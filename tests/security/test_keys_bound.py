"""Keys at rest are bound to their connection: a row changed in the database (repointed to
another host, or given another connection's ciphertext) makes the worker refuse, and the
keys go nowhere. Real worker, real PostgreSQL, the hostile host is a real HTTP server."""
from __future__ import annotations

import json

import pytest
from sqlalchemy import text, update

from models import PsaConnection, crypto
from models.db import session_scope
from tasks import admin, enqueue_resolve
from tasks.store import credentials_for
from tests.factories import wait_terminal
from tests.security.recorder import recorder  # noqa: F401 - fixture


def _raw(conn_id: int) -> tuple[bytes, bytes]:
    with session_scope() as db:
        row = db.execute(text("SELECT public_key_encrypted, private_key_encrypted FROM psa_connections "
                              "WHERE id = :i"), {"i": conn_id}).one()
        return bytes(row[0]), bytes(row[1])


def test_add_connection_stores_each_key_bound_to_the_connection_id_and_base_url(db_clean, monkeypatch):
    monkeypatch.setenv("PSA_ALLOWED_HOSTS", "cw.example")  # named, so not looked up (no DNS here)
    with session_scope() as db:
        conn = admin.add_connection(db, account_id=1, provider="connectwise", base_url="https://cw.example/apis/3.0/",
                                    company_id="acme", client_id="cid", public_key="fake-pub-1",
                                    private_key="fake-priv-1")
        cid = conn.id
    public, private = _raw(cid)
    for token, key in ((public, "fake-pub-1"), (private, "fake-priv-1")):
        envelope = json.loads(crypto.decrypt(token))
        assert envelope == {"v": 2, "conn": cid, "url": "https://cw.example/apis/3.0", "provider": "connectwise",
                            "key": key}
    creds, error = credentials_for(cid, cid, True, "https://cw.example/apis/3.0", "acme", "cid", public, private)
    assert error is None and (creds.public_key, creds.private_key) == ("fake-pub-1", "fake-priv-1")
    creds, error = credentials_for(cid + 1, cid + 1, True, "https://cw.example/apis/3.0", "acme", "cid", public,
                                   private)
    assert creds is None and f"PSA connection {cid + 1}" in error and "fake-" not in error


def test_a_connection_repointed_in_the_database_is_refused_and_no_key_leaves(world, worker, recorder):
    # Given a connection that works (the worker has its keys in its short-lived cache too)
    first = enqueue_resolve(None, world.session(9101), "Replaced the toner.")
    assert wait_terminal(first).state == "succeeded"
    # When someone with write access to the table points it at their own host
    with session_scope() as db:
        db.execute(update(PsaConnection).where(PsaConnection.id == world.connection_id)
                   .values(base_url=recorder.base_url))
    job_id = enqueue_resolve(None, world.session(9102), "Replaced the drum.")
    # Then the job fails with a configuration error naming the connection, and nothing
    # (no key, no note) reached that host
    j = wait_terminal(job_id)
    assert j.state == "failed" and j.error_type == "ConfigurationError"
    assert f"PSA connection {world.connection_id}" in j.error_message
    assert "encrypted for another connection or base URL" in j.error_message
    st = world.sim.state
    assert st.public_key not in j.error_message and st.private_key not in j.error_message
    assert recorder.requests == []


def test_another_connections_keys_copied_into_a_row_are_refused(world, worker, recorder):
    # Given a second tenant whose own connection points at a host it controls
    with session_scope() as db:
        evil = admin.add_connection(db, account_id=2, provider="connectwise", base_url=recorder.base_url,
                                    company_id="evil", client_id="evil", public_key="fake-evil-pub",
                                    private_key="fake-evil-priv")
        admin.set_preferences(db, 2, {"cw_resolved_status_id": 9})
        evil_id = evil.id
        sid = admin.create_session(db, account_id=2, psa_connection_id=evil_id, psa_ticket_id=9201).id
    # When the first tenant's ciphertext is copied into it
    public, private = _raw(world.connection_id)
    with session_scope() as db:
        db.execute(update(PsaConnection).where(PsaConnection.id == evil_id)
                   .values(public_key_encrypted=public, private_key_encrypted=private))
    j = wait_terminal(enqueue_resolve(None, sid, "Anything."))
    # Then the worker refuses to use them: the victim's keys never reach the thief
    assert j.state == "failed" and f"PSA connection {evil_id}" in j.error_message
    assert recorder.requests == []


def test_a_legacy_token_is_still_read(db_clean):
    # Written before keys were bound (rows not yet migrated, e.g. no key while migrating)
    legacy = crypto.encrypt("fake-legacy-key")
    assert crypto.decrypt_bound(legacy, conn_id=5, base_url="https://cw.example") == "fake-legacy-key"
    with pytest.raises(crypto.CredentialBindingError, match="PSA connection 5"):
        crypto.decrypt_bound(crypto.encrypt_bound("k", conn_id=6, base_url="https://cw.example", provider="x"),
                             conn_id=5, base_url="https://cw.example")
