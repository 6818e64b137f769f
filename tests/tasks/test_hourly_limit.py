"""A PSA's calls per rolling hour (Autotask: 10,000 per database, shared by every integration):
the window counted in Redis in the gate's one Lua call, the slowdown band before the budget,
the hard stop at it, and a real worker deferring an Autotask connection's jobs until the
window frees. Real Redis; the worker test also real PostgreSQL and the simulator over HTTP."""
from __future__ import annotations

import os
import time

import pytest
import redis

from providers import REGISTRY
from providers.simulators.autotask import AutotaskSimulator
from tasks import enqueue_resolve, ratelimit
from tests.factories import World, attempts, wait_terminal
from tests.tasks.test_tenant_limits import alerts, private_broker, start_workers  # noqa: F401  (fixture)


class _Clock:
    """ratelimit's `time` with a wall clock the test moves (the window is an hour)."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.monotonic, self.sleep = time.monotonic, time.sleep

    def time(self) -> float:
        return self.now


@pytest.fixture()
def hourly_key(limiter_keys):
    """A connection key of the test's own (tests/tasks/conftest.py removes its Redis keys)."""
    return limiter_keys


def _client() -> redis.Redis:
    return redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])


def _counted(key: str) -> dict[str, int]:
    raw = _client().hgetall(ratelimit._key("hourly", key))
    return {k.decode(): int(float(v)) for k, v in raw.items() if k not in (b"next", b"alerted")}


def _job(key: str, calls: int, hourly: tuple[int, int]) -> None:
    """One job's admission, as the runner makes it (its first PSA call)."""
    with ratelimit.counting_against(key, calls=calls, hourly=hourly):
        ratelimit.gate("autotask", "get_ticket")


@pytest.fixture()
def budget_100(monkeypatch):
    monkeypatch.setenv("PSA_RATE_LIMIT_PER_SECOND", "0")  # the bucket is not under test
    monkeypatch.setenv("AUTOTASK_HOURLY_CALL_BUDGET", "100")
    monkeypatch.setenv("AUTOTASK_HOURLY_SLOWDOWN_AT", "0.8")
    monkeypatch.setenv("LONG_DEFERRAL_ALERT_SECONDS", "600")
    clock = _Clock(1_800_000_000.0)  # on a minute boundary
    monkeypatch.setattr(ratelimit, "time", clock)
    return clock


def test_the_budget_and_slowdown_come_from_the_provider_and_the_settings(monkeypatch):
    # Autotask names its 10,000; we use 9,000 of them and slow down from 7,200
    limit = REGISTRY["autotask"].hourly_call_limit
    assert limit == 10_000
    assert ratelimit.hourly_limits("autotask", limit) == (9000, 7200)
    # ConnectWise and Halo name none: no hourly limit at all
    assert ratelimit.hourly_limits("connectwise", getattr(REGISTRY["connectwise"], "hourly_call_limit", None)) == (0, 0)
    assert ratelimit.hourly_limits("halo", getattr(REGISTRY["halo"], "hourly_call_limit", None)) == (0, 0)
    # a budget above the vendor's own limit is held to it
    monkeypatch.setenv("AUTOTASK_HOURLY_CALL_BUDGET", "50000")
    monkeypatch.setenv("AUTOTASK_HOURLY_SLOWDOWN_AT", "0.5")
    assert ratelimit.hourly_limits("autotask", limit) == (10_000, 5000)


def test_a_setting_that_is_not_a_number_is_named_and_the_default_used(monkeypatch, caplog):
    monkeypatch.setenv("AUTOTASK_HOURLY_CALL_BUDGET", "9k")
    assert ratelimit.hourly_limits("autotask", 10_000) == (9000, 7200)
    assert "AUTOTASK_HOURLY_CALL_BUDGET='9k' is not a number" in caplog.text


def test_the_window_counts_a_jobs_calls_and_forgets_minutes_older_than_the_window(hourly_key, budget_100):
    key, hourly = hourly_key(), ratelimit.hourly_limits("autotask", 10_000)
    # when two jobs of 5 calls run now and one of 3 calls half an hour later
    _job(key, 5, hourly)
    _job(key, 5, hourly)
    first_minute = int(budget_100.now // 60)
    budget_100.now += 1800
    _job(key, 3, hourly)
    # then the window holds 13 calls, per minute
    assert _counted(key) == {str(first_minute): 10, str(first_minute + 30): 3}
    # and an hour after the first two, their minute has fallen out (and is deleted)
    budget_100.now += 1800
    _job(key, 1, hourly)
    assert _counted(key) == {str(first_minute + 30): 3, str(first_minute + 60): 1}


def test_the_window_counts_the_calls_a_job_made_not_the_calls_it_expected(hourly_key, budget_100):
    key, hourly = hourly_key(), ratelimit.hourly_limits("autotask", 10_000)
    # given jobs that expect 5 calls each (a resolve), as the runner runs them (recount)
    def job(made: int, token: str) -> None:
        with ratelimit.counting_against(key, calls=5, token=token, hold=60, cap=3, hourly=hourly, recount=True):
            for _ in range(made):
                ratelimit.gate("autotask", "get_ticket")

    # when one makes 8 (a picklist load, a second page of notes) and the next only 1 (it failed)
    job(8, "long")
    assert sum(_counted(key).values()) == 8
    job(1, "short")
    # then the window holds the 9 calls made, not the 10 charged at admission
    assert sum(_counted(key).values()) == 9
    job(5, "exact")
    assert sum(_counted(key).values()) == 14
    # and a block without recount (take_token's callers) keeps what it was charged
    with ratelimit.counting_against(key, calls=5, hourly=hourly):
        ratelimit.gate("autotask", "get_ticket")
    assert sum(_counted(key).values()) == 19


def test_a_credit_is_never_written_to_a_minute_that_is_gone(hourly_key, budget_100):
    key, hourly = hourly_key(), ratelimit.hourly_limits("autotask", 10_000)
    with ratelimit.counting_against(key, calls=5, token="t", hold=60, cap=3, hourly=hourly, recount=True):
        ratelimit.gate("autotask", "get_ticket")
        _client().delete(ratelimit._key("hourly", key))  # the count expired meanwhile
    assert _counted(key) == {}  # no minute of -4 calls


def test_a_connection_without_an_hourly_limit_keeps_no_count(hourly_key, budget_100):
    key = hourly_key()
    for _ in range(30):
        _job(key, 5, (0, 0))  # ConnectWise: 150 calls, no budget
    assert not _client().exists(ratelimit._key("hourly", key))


def test_the_count_expires_when_the_connection_is_idle(hourly_key, monkeypatch):
    # given a 1.2 s window (real time: Redis expires the key)
    monkeypatch.setenv("PSA_HOURLY_WINDOW_SECONDS", "1.2")
    key = hourly_key()
    _job(key, 5, (100, 80))
    redis_key = ratelimit._key("hourly", key)
    assert 0 < _client().pttl(redis_key) <= 1220
    time.sleep(1.4)
    assert not _client().exists(redis_key)


def test_above_the_slowdown_share_jobs_are_paced_slower_the_nearer_the_budget(hourly_key, budget_100):
    key, hourly = hourly_key(), (100, 80)
    # given 80 calls in the window (the slowdown share of 100)
    for _ in range(16):
        _job(key, 5, hourly)
    # when the next job enters the band it goes, and sets the pace for the one after:
    # the budget left after it (15) spread over the hour, 5 calls' worth
    _job(key, 5, hourly)
    with pytest.raises(ratelimit.HourlySlowdown, match="AUTOTASK_HOURLY_SLOWDOWN_AT") as first:
        _job(key, 5, hourly)
    assert first.value.retry_after == pytest.approx(5 * 3600 / 15, abs=0.01)
    # then nothing was counted for the refused job
    assert sum(_counted(key).values()) == 85
    # and once that pace has passed, the next job goes and the pace after it is slower
    budget_100.now += first.value.retry_after
    _job(key, 5, hourly)
    with pytest.raises(ratelimit.HourlySlowdown) as second:
        _job(key, 5, hourly)
    assert second.value.retry_after == pytest.approx(5 * 3600 / 10, abs=0.01)
    assert second.value.retry_after > first.value.retry_after


def test_at_the_budget_jobs_wait_until_the_oldest_minutes_leave_the_window(hourly_key, budget_100):
    key, hourly = hourly_key(), (100, 100)  # no band: the hard stop alone
    start = budget_100.now
    # given 60 calls now and 40 calls ten minutes later: the budget used up
    for _ in range(12):
        _job(key, 5, hourly)
    budget_100.now += 600
    for _ in range(8):
        _job(key, 5, hourly)
    # when a job of 5 calls asks 5 minutes later
    budget_100.now += 300
    with pytest.raises(ratelimit.HourlyBudgetReached, match="AUTOTASK_HOURLY_CALL_BUDGET=100") as stop:
        _job(key, 5, hourly)
    # then it waits until the first minute's 60 calls leave the window, an hour after they were made
    assert stop.value.retry_after == pytest.approx(start + 3600 - budget_100.now, abs=0.01)
    assert "made 100 calls" in stop.value.message
    # and it took nothing: no count, no pace, no in-flight slot
    assert sum(_counted(key).values()) == 100
    # and at that moment it goes
    budget_100.now = start + 3600
    _job(key, 5, hourly)
    assert sum(_counted(key).values()) == 45


def test_a_long_hourly_pause_is_announced_by_one_job_only(hourly_key, budget_100):
    key, hourly = hourly_key(), (10, 10)
    _job(key, 10, hourly)
    budget_100.now += 60
    # when three jobs find the budget used up for the next 59 minutes (alert threshold 600 s)
    refused = []
    for _ in range(3):
        with pytest.raises(ratelimit.HourlyBudgetReached) as stop:
            _job(key, 2, hourly)
        refused.append(stop.value)
    # then the first says so, the others do not (one long_deferral alert per pause)
    assert [e.announce for e in refused] == [True, False, False]
    assert all(e.retry_after == pytest.approx(3540, abs=0.01) for e in refused)


def test_an_autotask_connection_at_its_budget_is_deferred_then_finishes_when_the_window_frees(private_broker,
                                                                                            tmp_path):
    # given an Autotask connection with a budget of 10 calls per 4 s window (a resolve with
    # a status change costs 5) and slowing down from 5
    sim = AutotaskSimulator().start()
    try:
        world = World.create(sim)
        [w] = start_workers(private_broker, tmp_path, 1, AUTOTASK_HOURLY_CALL_BUDGET="10",
                            AUTOTASK_HOURLY_SLOWDOWN_AT="0.5", PSA_HOURLY_WINDOW_SECONDS="4",
                            LONG_DEFERRAL_ALERT_SECONDS="1")
        try:
            # when 4 resolves are enqueued at once
            started = time.monotonic()
            ids = [enqueue_resolve(None, world.session(8700 + n), f"Autotask note {n}.") for n in range(4)]
            rows = [wait_terminal(i, timeout=90) for i in ids]
            took = time.monotonic() - started
        finally:
            w.stop()
        # then all of them finish, one note each
        assert all(r.state == "succeeded" for r in rows), [(r.id, r.state, r.error_message) for r in rows]
        assert all(len(sim.state.notes(8700 + n)) == 1 for n in range(4))
    finally:
        sim.stop()
    # and those over the budget were deferred without an HTTP call or a spent attempt
    hourly = 0
    for r in rows:
        waits = [x for x in attempts(r.id) if x.outcome == "deferred"]
        assert all(x.http_status is None and x.psa_ms is None for x in waits)
        assert r.max_attempts == 8 + len(waits)
        mine = [x for x in waits if x.error_type in ("HourlyBudgetReached", "HourlySlowdown")]
        assert all("AUTOTASK_HOURLY_CALL_BUDGET=10" in x.error_message for x in mine)
        hourly += len(mine)
    assert hourly >= 1
    # and 20 calls at 10 per 4 s window cannot all be made in one window (unlimited, these
    # four take well under a second; a minute of the window is 4/60 s, hence the margin)
    assert took >= 3.5
    # and a pause longer than LONG_DEFERRAL_ALERT_SECONDS (1 s here) raised the usual alert
    said = [a for a in alerts("long_deferral") if "HOURLY" in (a.message or "")]
    assert said and all("our own limiter deferred it" in a.message for a in said)


def test_nan_and_inf_settings_are_refused_like_typos(monkeypatch, caplog):
    # "nan" and "inf" parse as floats: unchecked, int(min(nan, ...)) would fail every Autotask job
    monkeypatch.setenv("AUTOTASK_HOURLY_CALL_BUDGET", "nan")
    monkeypatch.setenv("PSA_HOURLY_WINDOW_SECONDS", "inf")
    assert ratelimit.hourly_limits("autotask", 10_000) == (9000, 7200)
    assert ratelimit.hourly_window() == 3600
    assert "AUTOTASK_HOURLY_CALL_BUDGET='nan' is not a number" in caplog.text
