"""after_outer_commit: announce rows only once the outermost transaction committed them,
and forget only what a rollback took away (SAVEPOINTs fire SQLAlchemy's commit/rollback
events too)."""
from __future__ import annotations

import pytest

from models.db import after_outer_commit, session_factory


class Boom(Exception):
    pass


def test_savepoints_neither_run_nor_drop_what_the_outer_transaction_still_holds(db_clean):
    ran: list[list[str]] = []
    with session_factory()() as db:
        with db.begin():
            after_outer_commit(db, "k", "before", ran.append)
            with db.begin_nested():  # released: its item waits for the outer commit
                after_outer_commit(db, "k", "released", ran.append)
            with pytest.raises(Boom), db.begin_nested():  # rolled back: its item goes, no other
                after_outer_commit(db, "k", "rolled back", ran.append)
                with db.begin_nested():
                    after_outer_commit(db, "k", "inside the rolled back", ran.append)
                raise Boom
            after_outer_commit(db, "k", "after", ran.append)
            assert ran == []
    assert ran == [["before", "released", "after"]]


def test_an_outer_rollback_drops_everything_and_the_next_commit_runs_only_its_own(db_clean):
    ran: list[list[str]] = []
    with session_factory()() as db:
        with pytest.raises(Boom), db.begin():
            after_outer_commit(db, "k", "lost", ran.append)
            raise Boom
        with db.begin():
            after_outer_commit(db, "k", "kept", ran.append)
    assert ran == [["kept"]]
