"""db_retry (tasks.store): what a transient database error gets, and what any other error gets."""
from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from tasks import store


def _operational() -> OperationalError:
    return OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))


def test_a_transient_error_runs_the_call_again_with_growing_waits(monkeypatch):
    # given a call that fails twice with a dropped connection, then succeeds
    waits: list[float] = []
    monkeypatch.setattr(store.time, "sleep", waits.append)
    outcomes = [_operational(), _operational(), "done"]

    @store.db_retry
    def call(x: int, *, y: int) -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return f"{outcome} {x} {y}"

    # when it runs, then it is run again until it succeeds, with its arguments each time
    assert call(1, y=2) == "done 1 2"
    assert waits == [0.2, 0.4]
    assert call.__name__ == "call"


def test_it_gives_up_after_six_attempts_and_raises_the_last_error(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(store.time, "sleep", waits.append)
    errors = [_operational() for _ in range(6)]
    calls = []

    @store.db_retry
    def call() -> None:
        calls.append(1)
        raise errors[len(calls) - 1]

    with pytest.raises(OperationalError) as raised:
        call()
    assert raised.value is errors[-1]
    assert len(calls) == 6
    assert waits == [0.2, 0.4, 0.8, 1.6, 3.2]


def test_any_other_error_is_raised_at_once(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(store.time, "sleep", waits.append)
    calls = []

    @store.db_retry
    def call() -> None:
        calls.append(1)
        raise IntegrityError("INSERT", {}, Exception("duplicate key"))

    with pytest.raises(IntegrityError):
        call()
    assert calls == [1] and waits == []
