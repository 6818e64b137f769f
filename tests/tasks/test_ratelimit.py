"""Per-connection rate limits in Redis: the token bucket, the cooldown after a 429 (its
Retry-After honoured), and a 429 storm on one tenant that does not delay another.
Real Redis, real worker, the simulator over HTTP."""
from __future__ import annotations

import os
import time

import pytest
import redis

from models.db import session_scope
from tasks import enqueue_resolve, ratelimit
from tests.factories import RESOLVED, World, attempts, job, wait_terminal
from tests.harness import wait_for


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


def _redis_client() -> redis.Redis:
    return redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])


def test_the_in_flight_cap_admits_that_many_jobs_and_a_released_slot_is_free_again(limiter_keys, monkeypatch):
    # given a cap of 2 jobs in flight on a connection, and another connection
    monkeypatch.setenv("PSA_MAX_INFLIGHT_PER_CONNECTION", "2")
    key, other = limiter_keys(), limiter_keys()
    first, second = ratelimit.counting_against(key, token="job-1", hold=60), \
        ratelimit.counting_against(key, token="job-2", hold=60)
    with first:
        ratelimit.gate("connectwise", "list_notes")
        ratelimit.gate("connectwise", "post_note")  # the job's later calls pass without asking again
        with second:
            ratelimit.gate("connectwise", "list_notes")
            # then a third job of the same connection is refused, without a call, and waits to be
            # woken (its retry_after is only the safety net's recheck, 300 s by default)
            with ratelimit.counting_against(key, token="job-3", hold=60), \
                    pytest.raises(ratelimit.InflightCapReached) as refused:
                ratelimit.gate("connectwise", "list_notes")
            assert 300 <= refused.value.retry_after <= 330
            assert "PSA_MAX_INFLIGHT_PER_CONNECTION" in str(refused.value)
            # while another connection's job goes
            with ratelimit.counting_against(other, token="job-4", hold=60):
                ratelimit.gate("connectwise", "list_notes")
        # and once a job leaves, its slot is free for the next one
        assert _redis_client().zcard(ratelimit._key("inflight", key)) == 1
        with ratelimit.counting_against(key, token="job-3", hold=60):
            ratelimit.gate("connectwise", "list_notes")
    assert _redis_client().zcard(ratelimit._key("inflight", key)) == 0


def test_a_psas_own_concurrency_limit_caps_its_jobs_even_with_our_cap_off(limiter_keys, monkeypatch):
    # given Autotask's 3 concurrent requests, our cap at 8, then off
    from providers.autotask import AutotaskProvider

    limit = AutotaskProvider.max_concurrent_requests
    monkeypatch.setenv("PSA_MAX_INFLIGHT_PER_CONNECTION", "8")
    assert ratelimit.inflight_cap(limit) == 3 and ratelimit.inflight_cap(None) == 8
    monkeypatch.setenv("PSA_MAX_INFLIGHT_PER_CONNECTION", "2")
    assert ratelimit.inflight_cap(limit) == 2  # a lower cap of ours still wins
    monkeypatch.setenv("PSA_MAX_INFLIGHT_PER_CONNECTION", "0")
    assert ratelimit.inflight_cap(limit) == 3 and ratelimit.inflight_cap(None) == 0
    # when four jobs of one such connection ask at once
    key = limiter_keys()
    blocks = [ratelimit.counting_against(key, token=f"job-{n}", hold=60, cap=ratelimit.inflight_cap(limit))
              for n in range(4)]
    for block in blocks[:3]:
        block.__enter__()
        ratelimit.gate("autotask", "get_ticket")
    # then the fourth is deferred, naming the cap, and no slot is taken for it
    with blocks[3], pytest.raises(ratelimit.InflightCapReached, match="has 3 jobs in flight"):
        ratelimit.gate("autotask", "get_ticket")
    assert _redis_client().zcard(ratelimit._key("inflight", key)) == 3
    for block in reversed(blocks[:3]):  # nested in this one thread, so left innermost first
        block.__exit__(None, None, None)
    assert _redis_client().zcard(ratelimit._key("inflight", key)) == 0


def test_a_waiting_jobs_recheck_is_the_setting_jittered_and_a_bad_value_falls_back(monkeypatch):
    monkeypatch.setenv("PSA_INFLIGHT_RECHECK_SECONDS", "60")
    delays = [ratelimit.inflight_recheck() for _ in range(50)]
    assert all(60 <= d <= 66 for d in delays) and len(set(delays)) > 1
    monkeypatch.setenv("PSA_INFLIGHT_RECHECK_SECONDS", "nan")
    assert 300 <= ratelimit.inflight_recheck() <= 330


def test_a_slot_of_a_worker_that_died_mid_job_frees_itself_and_the_key_expires(limiter_keys, monkeypatch):
    monkeypatch.setenv("PSA_MAX_INFLIGHT_PER_CONNECTION", "1")
    key = limiter_keys()
    # given a job that took the only slot for 0.5 s (its lease) and never released it
    assert ratelimit.admit(key, 1, token="dead-job", hold=0.5) == ("go", 0.0)
    assert ratelimit.admit(key, 1, token="next-job", hold=0.5)[0] == "full"
    ttl = _redis_client().pttl(ratelimit._key("inflight", key))
    assert 0 < ttl <= 1500  # the set goes when idle: its newest slot's hold plus a second
    # then once its lease has run out, the next job gets the slot
    time.sleep(0.6)
    assert ratelimit.admit(key, 1, token="next-job", hold=0.5) == ("go", 0.0)
    wait_for(lambda: not _redis_client().exists(ratelimit._key("inflight", key)), timeout=3,
             message="the idle in-flight set to expire")


def test_a_job_over_its_rate_takes_no_slot(limiter_keys, monkeypatch):
    monkeypatch.setenv("PSA_MAX_INFLIGHT_PER_CONNECTION", "1")
    monkeypatch.setenv("PSA_RATE_LIMIT_PER_SECOND", "0.5")
    monkeypatch.setenv("PSA_RATE_LIMIT_BURST", "1")
    monkeypatch.setenv("PSA_RATE_LIMIT_MAX_WAIT_SECONDS", "0.5")
    key = limiter_keys()
    with ratelimit.counting_against(key, token="a", hold=60):
        ratelimit.gate("connectwise", "get_ticket")
    with ratelimit.counting_against(key, token="b", hold=60), pytest.raises(ratelimit.Throttled) as refused:
        ratelimit.gate("connectwise", "get_ticket")  # deferred for its tokens ...
    assert not isinstance(refused.value, ratelimit.InflightCapReached)
    assert _redis_client().zcard(ratelimit._key("inflight", key)) == 0  # ... holding no slot


def test_the_cap_is_off_at_zero_and_fails_open_without_redis(limiter_keys, monkeypatch):
    monkeypatch.setenv("PSA_MAX_INFLIGHT_PER_CONNECTION", "0")
    key = limiter_keys()
    for n in range(20):
        assert ratelimit.admit(key, 1, token=f"job-{n}", hold=60) == ("go", 0.0)
    monkeypatch.setenv("PSA_MAX_INFLIGHT_PER_CONNECTION", "1")
    monkeypatch.setenv("RATE_LIMIT_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    monkeypatch.setattr(ratelimit, "_failed_at", 0.0)
    try:
        for n in range(3):
            with ratelimit.counting_against(key, token=f"job-{n}", hold=60):
                ratelimit.gate("connectwise", "get_ticket")  # goes ahead: fail open
    finally:
        monkeypatch.setattr(ratelimit, "_failed_at", 0.0)


def test_a_retry_after_of_years_cools_down_for_the_cap_and_says_once_that_it_is_long(limiter_keys, monkeypatch):
    monkeypatch.setenv("PSA_MAX_RETRY_AFTER_SECONDS", "900")
    monkeypatch.setenv("LONG_DEFERRAL_ALERT_SECONDS", "600")
    key, short = limiter_keys(), limiter_keys()
    # when two workers hear the same 429 with Retry-After 99999999 (~3 years)
    left, made_long = ratelimit.start_cooldown(key, 99999999)
    again, made_long_again = ratelimit.start_cooldown(key, 99999999)
    # then the cooldown is the cap, and only the first hears that it made it long
    assert 899 <= left <= 900 and 899 <= ratelimit.cooldown_left(key) <= 900 and 899 <= again <= 900
    assert (made_long, made_long_again) == (True, False)
    # and a short one is not long
    assert ratelimit.start_cooldown(short, 3)[1] is False


def test_a_429_storm_on_one_tenant_neither_delays_another_nor_spends_attempts(db_clean, sim, worker):
    # given tenant A's PSA connection answering 429 with Retry-After 3 s to every call on
    # its tickets, and tenant B on its own connection
    a, b = World.create(sim, account_id=1), World.create(sim, account_id=2)
    a_tickets = list(range(8101, 8107))
    a_sessions = [a.session(t) for t in a_tickets]
    for t in a_tickets:
        sim.state.add_fault(action="error", status=429, retry_after=3, ticket_id=t, times=-1)
    b_session = b.session(8200)
    # when A's first job runs into the storm (its 429 starts the connection's cooldown), A's
    # other jobs come while the cooldown lasts, and B enqueues one resolve. (All six at once
    # let a busy machine's worker take them in one batch, every one past the gate before the
    # first 429 came back: then none met the cooldown, and nothing here tested it.)
    cooldown = ratelimit.connection_key(a.connection_id, sim.base_url)
    a_jobs = [enqueue_resolve(None, a_sessions[0], f"Tenant A {a_sessions[0]}.")]
    wait_for(lambda: ratelimit.cooldown_left(cooldown) > 0, timeout=10, message="A's first 429 and its cooldown")
    first_429 = time.monotonic()
    a_jobs += [enqueue_resolve(None, sid, f"Tenant A {sid}.") for sid in a_sessions[1:]]
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
        refused = [x for x in history if x.outcome == "deferred"]
        assert all(x.http_status is None and x.error_type == "CoolingDown" for x in refused)
        assert all(x.http_status == 429 for x in history if x not in refused)
        assert r.max_attempts == 8 + len(refused)
        throttled += len(refused)
    assert throttled >= 1
    # and once the storm is over, A's jobs finish too (none is left retrying, whose next
    # message would run a later test's job of the same id on the suite's worker)
    sim.state.faults.clear()
    assert all(wait_terminal(i, timeout=30).state == "succeeded" for i in a_jobs)
