"""models.base.UTCDateTime: every timestamp column reads back as an aware UTC datetime, on
SQLite (the demo's database, which stores no offset) as on PostgreSQL."""
from __future__ import annotations

import datetime as dt

from sqlalchemy import DateTime, select
from sqlalchemy.orm import Session

from models import AccountSettings, Alert, Base, WritebackJob, utcnow
from models.base import UTCDateTime
from models.db import make_engine, session_scope
from models.migrate import upgrade

PLUS_TWO = dt.timezone(dt.timedelta(hours=2))


def test_every_timestamp_column_of_every_table_is_utc_aware():
    columns = [(t.name, c.name, c.type) for t in Base.metadata.sorted_tables for c in t.columns
               if isinstance(c.type, (DateTime, UTCDateTime))]
    assert len(columns) > 20  # the check does look at the models' timestamps
    naive = [(t, c) for t, c, typ in columns if not isinstance(typ, UTCDateTime)]
    assert naive == []


def test_sqlite_reads_back_aware_utc_values_and_compares_with_utcnow(tmp_path):
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    upgrade(url)
    engine = make_engine(url)
    written = dt.datetime(2026, 11, 25, 20, 1, 19, 123456, tzinfo=PLUS_TWO)  # 18:01:19 UTC
    try:
        with Session(engine) as db, db.begin():
            db.add(AccountSettings(account_id=1, name="Acme", created_at=written))
            db.add(AccountSettings(account_id=2, name="Naive", created_at=dt.datetime(2026, 11, 25, 18, 0)))
        with Session(engine) as db:
            acme, naive = db.get(AccountSettings, 1), db.get(AccountSettings, 2)
            assert acme.created_at.tzinfo is not None and acme.created_at.utcoffset() == dt.timedelta(0)
            assert acme.created_at == written  # the same instant, stored as UTC
            assert acme.created_at.hour == 18
            assert naive.created_at == dt.datetime(2026, 11, 25, 18, 0, tzinfo=dt.timezone.utc)  # naive means UTC
            assert acme.created_at < utcnow()  # no TypeError: can't compare offset-naive and offset-aware
            # column reads and aggregates go through the type too
            assert db.scalar(select(AccountSettings.created_at).where(AccountSettings.account_id == 1)) == written
            oldest = db.scalar(select(AccountSettings.created_at).order_by(AccountSettings.created_at).limit(1))
            assert oldest.tzinfo is not None
    finally:
        engine.dispose()


def test_postgresql_values_are_utc_too(db_clean):
    written = dt.datetime(2026, 11, 25, 20, 1, 19, tzinfo=PLUS_TWO)
    with session_scope() as db:
        db.add(AccountSettings(account_id=1, name="Acme", created_at=written))
    with session_scope() as db:
        value = db.get(AccountSettings, 1).created_at
    assert value == written and value.utcoffset() == dt.timedelta(0)
    assert (WritebackJob.__table__.c.next_attempt_at.type.__class__, Alert.__table__.c.created_at.type.__class__) == \
        (UTCDateTime, UTCDateTime)
