"""Keys at rest over time: migration 0007 binds legacy tokens (and unbinds them on the way
down), and `psa-writeback rotate-keys` moves every stored key to the first key of
PSA_WRITEBACK_ENCRYPTION_KEYS so the old one can be removed. Real PostgreSQL, the CLI as a
subprocess."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text, update

from models import PsaConnection, crypto
from models.db import make_engine, session_scope
from models.migrate import downgrade, upgrade
from tasks import admin
from tasks.store import credentials_for
from tests import harness

ROOT = Path(__file__).resolve().parents[2]
K1 = harness.FAKE_FERNET_KEY  # the suite's key: what the rows below are encrypted with
BEFORE_0007 = "0006_note_watermark"


# Allowed by name, so add_connection does not look them up (there is no DNS here).
_NAMED_HOSTS = "one.example,two.example,three.example,cw.example"

def rotate_keys(keys: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "rotate-keys", "--json"], cwd=ROOT, timeout=120,
                          capture_output=True, text=True, env={**os.environ, crypto.ENV_VAR: keys})
    assert "fake-" not in proc.stdout + proc.stderr  # no key in the report
    return proc.returncode, json.loads(proc.stdout)


def _add(account: int, url: str, pub: str, priv: str) -> int:
    with session_scope() as db:
        return admin.add_connection(db, account_id=account, provider="connectwise", base_url=url, company_id="c",
                                    client_id="i", public_key=pub, private_key=priv).id


def _make_legacy(conn_id: int, pub: str, priv: str) -> None:
    """A row as releases before key binding wrote it: the plain key, encrypted."""
    with session_scope() as db:
        db.execute(update(PsaConnection).where(PsaConnection.id == conn_id)
                   .values(public_key_encrypted=crypto.encrypt(pub), private_key_encrypted=crypto.encrypt(priv)))


def _keys_of(conn_id: int) -> tuple[str, str] | str:
    with session_scope() as db:
        c = db.get(PsaConnection, conn_id)
        row = (conn_id, c.id, c.is_active, c.base_url, c.company_id, c.client_id, c.public_key_encrypted,
               c.private_key_encrypted)
    creds, error = credentials_for(*row)
    return error if creds is None else (creds.public_key, creds.private_key)


def test_rotate_keys_moves_every_key_to_the_new_key_binds_legacy_rows_and_is_idempotent(db_clean, monkeypatch):
    monkeypatch.setenv("PSA_ALLOWED_HOSTS", _NAMED_HOSTS)
    # Given two connections encrypted with K1, one of them still in the legacy form
    bound = _add(1, "https://one.example/apis/3.0", "fake-pub-1", "fake-priv-1")
    legacy = _add(2, "https://two.example/apis/3.0", "fake-pub-2", "fake-priv-2")
    _make_legacy(legacy, "fake-pub-2", "fake-priv-2")
    k2 = crypto.generate_key()
    # When the operator puts K2 first and rotates
    code, report = rotate_keys(f"{k2},{K1}")
    assert code == 0
    assert report == {"rotated": 2, "bound": 1, "already_current": 0, "failed": []}
    # Then K2 alone reads every key, each bound to its own connection
    monkeypatch.setenv(crypto.ENV_VAR, k2)
    assert _keys_of(bound) == ("fake-pub-1", "fake-priv-1")
    assert _keys_of(legacy) == ("fake-pub-2", "fake-priv-2")
    with session_scope() as db:
        token = db.get(PsaConnection, legacy).private_key_encrypted
    assert json.loads(crypto.decrypt(token))["conn"] == legacy
    # And a second run changes nothing
    code, report = rotate_keys(k2)
    assert (code, report) == (0, {"rotated": 0, "bound": 0, "already_current": 2, "failed": []})


def test_rotate_keys_reports_what_it_cannot_rotate_and_never_rebinds_a_repointed_row(db_clean, monkeypatch):
    monkeypatch.setenv("PSA_ALLOWED_HOSTS", _NAMED_HOSTS)
    good = _add(1, "https://one.example/apis/3.0", "fake-pub-1", "fake-priv-1")
    moved = _add(2, "https://two.example/apis/3.0", "fake-pub-2", "fake-priv-2")
    lost = _add(3, "https://three.example/apis/3.0", "fake-pub-3", "fake-priv-3")
    with session_scope() as db:  # repointed in the database; and keys under a key nobody has any more
        db.execute(update(PsaConnection).where(PsaConnection.id == moved).values(base_url="https://evil.example"))
        db.execute(update(PsaConnection).where(PsaConnection.id == lost).values(
            private_key_encrypted=crypto.MultiFernet([crypto.Fernet(crypto.generate_key())]).encrypt(b"x")))
        before = {c.id: bytes(c.private_key_encrypted) for c in db.query(PsaConnection)}
    code, report = rotate_keys(f"{crypto.generate_key()},{K1}")
    assert code == 1  # an old key may not be removed yet
    assert report["rotated"] == 1 and report["already_current"] == 0
    failed = {f["connection_id"]: f["reason"] for f in report["failed"]}
    assert set(failed) == {moved, lost}
    assert "encrypted for another connection or base URL" in failed[moved]
    assert "cannot be decrypted" in failed[lost]
    with session_scope() as db:
        after = {c.id: bytes(c.private_key_encrypted) for c in db.query(PsaConnection)}
    assert after[moved] == before[moved] and after[lost] == before[lost] and after[good] != before[good]


def test_rotate_keys_without_any_key_says_so(db_clean):
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "rotate-keys"], cwd=ROOT, timeout=120,
                          capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != crypto.ENV_VAR})
    assert proc.returncode == 2 and "PSA_WRITEBACK_ENCRYPTION_KEYS is not set" in proc.stderr


# --- migration 0007 -----------------------------------------------------------------------

@pytest.fixture()
def db_at_0006():
    url = harness.create_database()
    upgrade(url, BEFORE_0007)
    engine = make_engine(url)
    yield url, engine
    engine.dispose()
    harness.drop_database(url)


def _insert_legacy_connection(engine, conn_id: int, url: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO account_settings (account_id, name, preferences, created_at, updated_at) "
                          "VALUES (1, '', '{}', now(), now()) ON CONFLICT DO NOTHING"))
        conn.execute(text("INSERT INTO psa_connections (id, account_id, provider, base_url, company_id, client_id, "
                          "public_key_encrypted, private_key_encrypted, is_active, created_at, updated_at) VALUES "
                          "(:id, 1, 'connectwise', :url, 'c', 'i', :pub, :priv, true, now(), now())"),
                     {"id": conn_id, "url": url, "pub": crypto.encrypt(f"fake-pub-{conn_id}"),
                      "priv": crypto.encrypt(f"fake-priv-{conn_id}")})


def _plain(engine, conn_id: int) -> str:
    with engine.connect() as conn:
        token = conn.execute(text("SELECT private_key_encrypted FROM psa_connections WHERE id = :i"),
                             {"i": conn_id}).scalar_one()
    return crypto.decrypt(bytes(token))


def test_migration_binds_legacy_keys_and_the_downgrade_unbinds_them(db_at_0006):
    url, engine = db_at_0006
    _insert_legacy_connection(engine, 41, "https://cw.example/apis/3.0")
    upgrade(url)
    assert json.loads(_plain(engine, 41)) == {"v": 2, "conn": 41, "url": "https://cw.example/apis/3.0",
                                              "provider": "connectwise", "key": "fake-priv-41"}
    downgrade(url, BEFORE_0007)  # older code would send an envelope as the key
    assert _plain(engine, 41) == "fake-priv-41"


def test_migration_without_the_keys_leaves_legacy_rows_for_rotate_keys(db_at_0006, monkeypatch, caplog):
    url, engine = db_at_0006
    _insert_legacy_connection(engine, 42, "https://cw.example/apis/3.0")
    monkeypatch.delenv(crypto.ENV_VAR)
    with caplog.at_level(logging.WARNING):
        upgrade(url)
    assert "PSA_WRITEBACK_ENCRYPTION_KEYS is not set" in caplog.text and "rotate-keys" in caplog.text
    monkeypatch.setenv(crypto.ENV_VAR, K1)
    assert _plain(engine, 42) == "fake-priv-42"  # still legacy, still readable
