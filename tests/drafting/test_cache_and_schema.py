"""The preview cache rows (enqueue side, no worker) and the 0002 migration on SQLite."""
from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from drafting.service import request_preview
from models import Base, DraftKind
from models.db import make_engine, session_scope
from models.migrate import downgrade, upgrade
from tasks.drafting import enqueue_draft_preview
from tasks.errors import NotFoundError, RequestError
from tests.drafting.builders import add_message, make_session, previews

DRAFT_TABLES = {"ai_session_messages", "ai_session_context", "draft_previews"}


def test_a_pending_preview_of_an_older_state_is_superseded_when_the_state_changes(db_clean):
    sid = make_session()
    with session_scope() as db:
        old, needs_run = request_preview(db, sid, DraftKind.ESCALATION)
        assert needs_run and old.status == "pending" and not old.cached
    add_message(sid, "engineer", "One more finding.")
    with session_scope() as db:
        new, _ = request_preview(db, sid, DraftKind.ESCALATION)
        res, _ = request_preview(db, sid, DraftKind.RESOLUTION)
    rows = {p.id: p for p in previews(sid)}
    assert rows[old.preview_id].status == "superseded"
    assert "the session changed" in rows[old.preview_id].error
    assert rows[new.preview_id].status == "pending" and rows[res.preview_id].status == "pending"
    assert new.state_hash == res.state_hash != old.state_hash  # one state, two kinds, two rows


def test_asking_twice_for_the_same_pending_state_reuses_the_row(db_clean):
    sid = make_session()
    with session_scope() as db:
        first, _ = request_preview(db, sid, DraftKind.RESOLUTION)
    with session_scope() as db:
        again, needs_run = request_preview(db, sid, DraftKind.RESOLUTION)
    assert again.preview_id == first.preview_id and needs_run  # republished: a lost message must not strand it
    assert len(previews(sid)) == 1


def test_enqueue_rejects_bad_input_and_writes_nothing(db_clean):
    sid = make_session()
    empty = make_session([])
    with pytest.raises(RequestError, match="kind must be one of resolution, escalation, got 'summary'"):
        enqueue_draft_preview(sid, "summary")
    with pytest.raises(RequestError, match="session_id must be a positive integer"):
        enqueue_draft_preview(True, "resolution")
    with pytest.raises(NotFoundError, match="unknown session 424242"):
        enqueue_draft_preview(424242, "resolution")
    with pytest.raises(RequestError, match="has no transcript messages"):
        enqueue_draft_preview(empty, "resolution")
    assert previews(sid) == [] and previews(empty) == []


def test_drafting_migration_matches_the_models_on_sqlite_and_downgrades_cleanly(tmp_path):
    url = f"sqlite:///{tmp_path / 'drafting.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert DRAFT_TABLES <= set(inspect(conn).get_table_names())
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert [d for d in diff if any(t in repr(d) for t in DRAFT_TABLES)] == []
            uniques = {u["name"]: u["column_names"] for u in inspect(conn).get_unique_constraints("draft_previews")}
            assert uniques == {"uq_draft_previews_session_id": ["session_id", "kind", "state_hash"]}
        downgrade(url, "0001")
        with engine.connect() as conn:
            assert not DRAFT_TABLES & set(inspect(conn).get_table_names())
    finally:
        engine.dispose()
