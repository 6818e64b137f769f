"""Per-connection rate limits in Redis: the token bucket, the cooldown after a 429 (its
Retry-After honoured), and a 429 storm on one tenant that does not delay another.
Real Redis, real worker, the simulator over HTTP."""
from __future__ import annotations

import os
import time
import uuid

import pytest
import redis

from models.db import session_scope
from tasks import enqueue_resolve, ratelimit
from tests.factories import RESOLVED, World, attempts, job, wait_terminal
from tests.harness import wait_for


@pytest.fixture()
def limiter_keys():
    """Each test's own connection keys; whatever they leave in Redis is removed after it."""
    made: list[str] = []

    def new() -> str:
        made.append(f"test-{uuid.uuid4().hex[:8]}")
        return made[-1]

    yield new
    client = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])
    for key in made:
        client.delete(ratelimit._key("cooldown", key), ratelimit._key("bucket", key))


def test_the_bucket_lets_a_burst_through_then_holds_calls_to_the_rate(limiter_keys, monkeypatch):
    # given 10 calls/s with a burst of 5 on one connection
    monkeypatch.setenv("PSA_RATE_LIMIT_PER_SECOND", "10")
    monkeypatch.setenv("PSA_RATE_LIMIT_BURST", "5")
    key, other = limiter_keys(), limiter_keys()
    # when 15 calls pass the gate
    started = time.monotonic()
    for _ in range(15):  # one call per job here
        with ratelimit.counting_against(key):
            ratelimit.gate("connectwise", "get_ticket")
    elapsed = time.monotonic() - started
    # then the 5 of the burst went at once and the other 10 at 10/s
    assert 0.85 <= elapsed < 2.5, elapsed
    # and another connection's bucket is untouched
    assert ratelimit.take_token(other) == 0


def test_a_wait_longer_than_the_maximum_defers_instead_of_sleeping(limiter_keys, monkeypatch):
    monkeypatch.setenv("PSA_RATE_LIMIT_PER_SECOND", "0.5")
    monkeypatch.setenv("PSA_RATE_LIMIT_BURST", "1")
    monkeypatch.setenv("PSA_RATE_LIMIT_MAX_WAIT_SECONDS", "0.5")
    key = limiter_keys()
    with ratelimit.counting_against(key):
        ratelimit.gate("connectwise", "get_ticket")  # the burst's one token
    started = time.monotonic()
    with ratelimit.counting_against(key), pytest.raises(ratelimit.Throttled) as refused:
        ratelimit.gate("connectwise", "get_ticket")
    assert time.monotonic() - started < 0.3  # no thread parked for the 2 s a token takes
    assert 1.5 <= refused.value.retry_after <= 2.01


def test_a_job_takes_the_tokens_of_all_its_calls_at_its_first_call(limiter_keys, monkeypatch):
    # given 5 calls/s with a burst of 5, and a job of 5 calls
    monkeypatch.setenv("PSA_RATE_LIMIT_PER_SECOND", "5")
    monkeypatch.setenv("PSA_RATE_LIMIT_BURST", "5")
    key = limiter_keys()
    started = time.monotonic()
    with ratelimit.counting_against(key, calls=5):
        for _ in range(5):
            ratelimit.gate("connectwise", "get_ticket")
    # then it went at once, and the next job waits for a second's worth of tokens
    assert time.monotonic() - started < 0.3
    assert 0.9 <= ratelimit.take_token(key, 5) <= 1.05


def test_the_cooldown_lasts_retry_after_and_is_never_shortened(limiter_keys):
    key = limiter_keys()
    ratelimit.start_cooldown(key, 2.0)
    ratelimit.start_cooldown(key, 0.2)  # a later, shorter Retry-After from another worker
    assert 1.8 <= ratelimit.cooldown_left(key) <= 2.0
    with ratelimit.counting_against(key), pytest.raises(ratelimit.Throttled) as refused:
        ratelimit.gate("connectwise", "post_note")
    assert 1.8 <= refused.value.retry_after <= 2.0
    wait_for(lambda: ratelimit.cooldown_left(key) == 0, timeout=3, message="the cooldown to end")
    with ratelimit.counting_against(key):
        ratelimit.gate("connectwise", "post_note")  # passes again


def test_a_429_storm_on_one_tenant_neither_delays_another_nor_spends_attempts(db_clean, sim, worker):
    # given tenant A's PSA connection answering 429 with Retry-After 3 s to every call on
    # its tickets, and tenant B on its own connection
    a, b = World.create(sim, account_id=1), World.create(sim, account_id=2)
    a_tickets = list(range(8101, 8107))
    a_sessions = [a.session(t) for t in a_tickets]
    for t in a_tickets:
        sim.state.add_fault(action="error", status=429, retry_after=3, ticket_id=t, times=-1)
    b_session = b.session(8200)
    # when A's jobs run into the storm, and B enqueues one resolve
    a_jobs = [enqueue_resolve(None, sid, f"Tenant A {sid}.") for sid in a_sessions]
    wait_for(lambda: sim.state.calls["list_notes"] >= 1, timeout=10, message="A's first call")
    first_429 = time.monotonic()
    b_job = wait_terminal(enqueue_resolve(None, b_session, "Tenant B's one resolve."), timeout=10)
    # then B is done at once, verified
    assert b_job.state == "succeeded" and b_job.result["outcome"] == "verified"
    assert (b_job.finished_at - b_job.created_at).total_seconds() < 2.0
    assert sim.state.status_of(8200) == RESOLVED
    # and while the cooldown lasts (Retry-After 3 s), A's PSA sees at most one call per job
    # (those already past the gate when the first 429 came back), not a retry storm
    time.sleep(max(0.0, first_429 + 2.5 - time.monotonic()))
    b_calls = 5  # list notes, post, get, patch, re-read
    assert sum(sim.state.calls.values()) - b_calls <= len(a_jobs), sim.state.calls
    rows = [job(i) for i in a_jobs]
    assert all(r.state in ("retrying", "running") for r in rows), [r.state for r in rows]
    # refusals by the cooldown made no call and spent no attempt (max_attempts grew by one each)
    throttled = 0
    for r in rows:
        history = [x for x in attempts(r.id) if x.outcome != "running"]
        refused = [x for x in history if x.error_type == "Throttled"]
        assert all(x.http_status is None for x in refused)
        assert all(x.http_status == 429 for x in history if x not in refused)
        assert r.max_attempts == 8 + len(refused)
        throttled += len(refused)
    assert throttled >= 1
