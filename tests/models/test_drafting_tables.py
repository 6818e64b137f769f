"""The drafting tables the web app writes accept an INSERT naming only the README's
documented columns (issue 10, defect 5): timestamps come from server defaults."""
from __future__ import annotations

import datetime as dt

from sqlalchemy import text

from models.db import get_engine, session_scope
from tasks import admin


def test_an_insert_with_the_documented_columns_works_on_postgresql(db_clean):
    with session_scope() as db:
        sid = admin.create_session(db, account_id=1, title="printer").id
    engine = get_engine()
    assert engine.dialect.name == "postgresql"
    with engine.begin() as conn:  # what the web app runs: no created_at / updated_at
        conn.execute(text("INSERT INTO ai_session_messages (session_id, position, role, content) "
                          "VALUES (:s, 1, 'engineer', 'The printer is offline.')"), {"s": sid})
        conn.execute(text("INSERT INTO ai_session_context (session_id, ticket_summary, ticket_description) "
                          "VALUES (:s, 'Printer offline', 'It stopped after the update.')"), {"s": sid})
    with engine.connect() as conn:
        created = conn.execute(text("SELECT created_at FROM ai_session_messages WHERE session_id = :s"),
                               {"s": sid}).scalar_one()
        updated = conn.execute(text("SELECT updated_at FROM ai_session_context WHERE session_id = :s"),
                               {"s": sid}).scalar_one()
    now = dt.datetime.now(dt.timezone.utc)
    for stamp in (created, updated):
        assert stamp.tzinfo is not None and abs((now - stamp).total_seconds()) < 60
