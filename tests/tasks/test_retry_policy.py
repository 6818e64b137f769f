"""Backoff decisions: exponential with equal jitter, vendor Retry-After as a floor, a
settle time after a POST that may have landed, and countdowns kept well under the broker's
visibility timeout."""
from __future__ import annotations

import random

import pytest

from providers.errors import (PsaBadRequest, PsaRateLimited, PsaRecordBusy, PsaTransientError, from_response)
from tasks.retry import RetryPolicy, post_may_have_landed

POLICY = RetryPolicy(base_seconds=30, factor=2, max_delay_seconds=1800, max_attempts=8, post_settle_seconds=45)


@pytest.mark.parametrize("attempt,ceiling", [(1, 30), (2, 60), (3, 120), (6, 960), (7, 1800), (20, 1800)])
def test_delay_is_half_fixed_half_random_under_an_exponential_ceiling(attempt, ceiling):
    delays = [POLICY.delay(attempt, rng=random.Random(seed)) for seed in range(200)]
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert max(delays) - min(delays) > ceiling / 4  # really jittered: a burst does not retry in step


def test_retry_after_is_a_floor_but_never_beyond_the_maximum():
    assert POLICY.delay(1, PsaRateLimited("slow down", retry_after=300), rng=random.Random(1)) == 300
    # the tenant's server picks Retry-After: PSA_MAX_RETRY_AFTER_SECONDS (default 900) caps it
    assert POLICY.delay(1, PsaRateLimited("slow down", retry_after=99999999), rng=random.Random(1)) == 900
    assert POLICY.delay(1, PsaRateLimited("slow down", retry_after=1), rng=random.Random(1)) < 31


def test_retry_after_is_honoured_above_the_backoff_cap_up_to_its_own_cap():
    # a 2 s backoff cap (as in the tests) must not cut a 60 s Retry-After short: asking
    # sooner only earns another 429; only PSA_MAX_RETRY_AFTER_SECONDS bounds it
    short = RetryPolicy(base_seconds=0.2, max_delay_seconds=2, max_retry_after_seconds=120)
    assert short.delay(1, PsaRateLimited("slow down", retry_after=60), rng=random.Random(1)) == 60
    assert short.delay(1, PsaRateLimited("slow down", retry_after=10**8), rng=random.Random(1)) == 120


def test_the_retry_after_cap_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("PSA_MAX_RETRY_AFTER_SECONDS", "42")
    assert RetryPolicy.from_env().max_retry_after_seconds == 42
    monkeypatch.delenv("PSA_MAX_RETRY_AFTER_SECONDS")
    assert RetryPolicy.from_env().max_retry_after_seconds == 900


def test_the_backoff_exponent_counts_real_failures_not_deferrals():
    # given a job on its 6th execution whose 5 earlier ones were deferred by our own limiter
    from tasks.store import ClaimedJob

    job = ClaimedJob(id=1, kind="resolve", token="t", attempt_no=6, max_attempts=13, session_id=1, account_id=1,
                     provider="connectwise", connection_id=1, ticket_id=1, markdown="x", note_visibility=None,
                     note_state="none", note_baseline_ids=[], note_external_id=None, target_status_id=9,
                     transition_skipped_reason=None, credentials=None, deferrals=5)
    # then a real failure now is failure #1, and waits the first step's delay (30 s base)
    assert job.failure_no == 1
    delays = [POLICY.delay(job.failure_no, PsaTransientError("500"), rng=random.Random(s)) for s in range(50)]
    assert all(15 <= d <= 30 for d in delays)


@pytest.mark.parametrize("error,settles", [
    (PsaTransientError("timed out", operation="post_note"), True),
    (from_response(502, {}, operation="post_note"), True),
    (PsaTransientError("reset", operation="update_status"), False),  # PATCH is re-read, not reconciled
    (PsaTransientError("reset", operation="list_notes"), False),
    (PsaRateLimited("429", operation="post_note"), False),  # refused before doing anything
    (PsaRecordBusy("409", operation="post_note"), False),
    (PsaBadRequest("400", operation="post_note"), False),  # not retried at all
])
def test_a_post_that_may_have_landed_waits_the_settle_time(error, settles):
    assert post_may_have_landed(error) is settles
    delay = POLICY.delay(1, error, rng=random.Random(3))
    assert (delay >= 45) is settles


def test_settle_time_defaults_to_the_read_timeout(monkeypatch):
    monkeypatch.delenv("POST_SETTLE_SECONDS", raising=False)
    monkeypatch.setenv("PSA_READ_TIMEOUT", "12")
    assert RetryPolicy.from_env().post_settle_seconds == 12


def test_countdowns_stay_well_under_the_visibility_timeout(monkeypatch):
    from tasks import writeback
    from worker.app import app

    options = dict(app.conf.broker_transport_options)
    try:
        for visibility, expected in ((7200, 1800), (30, 15), (600, 300)):
            app.conf.broker_transport_options = {**options, "visibility_timeout": visibility}
            assert writeback.max_countdown() == expected
    finally:
        app.conf.broker_transport_options = options


@pytest.mark.parametrize("attempt,ceiling", [(0, 10), (1, 10), (2, 30), (3, 90), (4, 200), (50, 200)])
def test_jittered_delay_is_half_fixed_half_random_under_its_ceiling(attempt, ceiling):
    from tasks.retry import jittered_delay

    delays = [jittered_delay(attempt, 10, 200, factor=3, rng=random.Random(seed)) for seed in range(200)]
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert max(delays) - min(delays) > ceiling / 4


def test_jittered_delay_takes_retry_after_as_a_floor_capped_at_the_maximum():
    from tasks.retry import jittered_delay

    assert jittered_delay(1, 10, 200, retry_after=150, rng=random.Random(1)) == 150
    assert jittered_delay(1, 10, 200, retry_after=10**6, rng=random.Random(1)) == 200  # the cap wins
    assert jittered_delay(1, 10, 200, retry_after=0, rng=random.Random(1)) <= 10


def test_policy_delay_is_the_shared_formula_plus_the_settle_floor():
    from tasks.retry import jittered_delay

    for attempt in range(1, 10):
        for error in (None, PsaRateLimited("slow down", retry_after=400)):
            expected = jittered_delay(attempt, 30, 1800, factor=2, rng=random.Random(attempt),
                                      retry_after=error.retry_after if error else None)
            assert POLICY.delay(attempt, error, rng=random.Random(attempt)) == expected
    landed = PsaTransientError("timed out", operation="post_note")
    assert POLICY.delay(1, landed, rng=random.Random(0)) == max(
        jittered_delay(1, 30, 1800, rng=random.Random(0)), 45)


def test_settle_time_follows_the_providers_read_timeout_default(monkeypatch):
    from providers.http import timeouts

    monkeypatch.delenv("POST_SETTLE_SECONDS", raising=False)
    monkeypatch.delenv("PSA_READ_TIMEOUT", raising=False)
    assert RetryPolicy.from_env().post_settle_seconds == timeouts()[1]
