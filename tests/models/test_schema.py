"""Migrations from an empty database, and credentials encrypted at rest."""
from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from models import Base, PsaConnection, crypto
from models.db import make_engine, session_scope
from models.migrate import downgrade, upgrade
from tasks import admin
from tests import harness


@pytest.fixture()
def empty_db():
    url = harness.create_database()
    yield url
    harness.drop_database(url)


def test_migrations_build_the_models_schema_from_an_empty_database(empty_db):
    upgrade(empty_db)
    engine = make_engine(empty_db)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            tables = set(inspect(conn).get_table_names())
        assert diff == [], f"models and migrations disagree: {diff}"
        assert {"ai_sessions", "account_settings", "psa_connections", "writeback_jobs",
                "writeback_attempts"} <= tables
    finally:
        engine.dispose()


def test_migrations_downgrade_to_empty_and_up_again(empty_db):
    upgrade(empty_db)
    downgrade(empty_db, "base")
    engine = make_engine(empty_db)
    try:
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    upgrade(empty_db)


def test_migrations_run_on_sqlite_for_the_demo(tmp_path):
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert "writeback_jobs" in inspect(conn).get_table_names()
    finally:
        engine.dispose()


def test_connection_keys_are_encrypted_at_rest(db_clean, monkeypatch):
    monkeypatch.setenv("PSA_ALLOWED_HOSTS", "cw.example")  # named, so not looked up (no DNS here)
    with session_scope() as db:
        conn = admin.add_connection(db, account_id=1, provider="connectwise", base_url="https://cw.example/apis/3.0",
                                    company_id="acme", client_id="cid", public_key="fake-pub-KEY1",
                                    private_key="fake-priv-KEY2")
        cid = conn.id
    with session_scope() as db:
        raw = db.execute(text("SELECT public_key_encrypted, private_key_encrypted FROM psa_connections WHERE id=:i"),
                         {"i": cid}).one()
        assert b"fake-priv-KEY2" not in bytes(raw[1]) and b"fake-pub-KEY1" not in bytes(raw[0])
        row = db.get(PsaConnection, cid)
        assert crypto.decrypt_bound(row.private_key_encrypted, conn_id=cid, base_url=row.base_url) == "fake-priv-KEY2"
        assert "fake-priv" not in repr(row)


def test_missing_encryption_key_is_a_configuration_error(monkeypatch):
    monkeypatch.delenv(crypto.ENV_VAR)
    with pytest.raises(crypto.ConfigurationError, match="PSA_WRITEBACK_ENCRYPTION_KEYS is not set"):
        crypto.encrypt("x")


def test_key_rotation_old_tokens_still_decrypt(monkeypatch):
    old = crypto.encrypt("secret-v1")
    monkeypatch.setenv(crypto.ENV_VAR, f"{crypto.generate_key()},{harness.FAKE_FERNET_KEY}")
    assert crypto.decrypt(old) == "secret-v1"
    monkeypatch.setenv(crypto.ENV_VAR, crypto.generate_key())
    with pytest.raises(crypto.CredentialDecryptError, match="cannot be decrypted"):
        crypto.decrypt(old)
