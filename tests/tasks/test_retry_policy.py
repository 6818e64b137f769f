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
    assert POLICY.delay(1, PsaRateLimited("slow down", retry_after=99999), rng=random.Random(1)) == 1800
    assert POLICY.delay(1, PsaRateLimited("slow down", retry_after=1), rng=random.Random(1)) < 31


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
