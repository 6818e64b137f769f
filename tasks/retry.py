"""Backoff policy for transient PSA errors. Kept in the job row (next_attempt_at), not only
in a Celery countdown, so a lost retry message delays a job but never loses it."""
from __future__ import annotations

import random
from dataclasses import dataclass

from models import settings
from providers.errors import PsaError, PsaRateLimited, PsaRecordBusy
from providers.http import timeouts
from tasks.ratelimit import max_retry_after


def jittered_delay(attempt: int, base: float, cap: float, *, factor: float = 2.0,
                   retry_after: float | None = None, retry_after_cap: float | None = None,
                   rng: random.Random | None = None) -> float:
    """Delay after failed attempt number `attempt` (1-based): exponential from `base` with
    "equal jitter" (half fixed, half random, never above `cap`) so a burst of failures does
    not retry in step. A server's Retry-After is a floor, since asking sooner just earns
    another 429, even above the backoff's `cap`; but the server chooses it, so it is capped
    at `retry_after_cap` (default: `cap`): a huge value must not park a caller for years,
    the cap wins and the next 429 says so again. Pure: no clock, no environment."""
    rng = rng or random
    ceiling = min(cap, base * factor ** max(attempt - 1, 0))
    delay = ceiling / 2 + rng.uniform(0, ceiling / 2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap if retry_after_cap is None else retry_after_cap))
    return delay


@dataclass(frozen=True)
class RetryPolicy:
    base_seconds: float = 30.0
    factor: float = 2.0
    max_delay_seconds: float = 1800.0
    max_attempts: int = 8
    # After a POST whose outcome we did not see, wait at least this long before the next
    # execution lists the notes: a PSA that was still working on it when our read timed
    # out gets that long again to finish, so the reconcile sees the note (tasks.steps).
    post_settle_seconds: float = 30.0
    # A vendor Retry-After is honoured up to this (PSA_MAX_RETRY_AFTER_SECONDS), whatever
    # the backoff's own cap: the tenant's server picks the value.
    max_retry_after_seconds: float = 900.0

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        # Defaults give ~8 attempts over about an hour: 30 s, 1, 2, 4, 8, 16, 30 min (jittered).
        return cls(base_seconds=settings.number("RETRY_BASE_SECONDS", 30, minimum=0),
                   factor=settings.number("RETRY_FACTOR", 2, minimum=1),
                   max_delay_seconds=settings.number("RETRY_MAX_DELAY_SECONDS", 1800, minimum=0),
                   max_attempts=settings.integer("RETRY_MAX_ATTEMPTS", 8, positive=True),
                   post_settle_seconds=settings.number("POST_SETTLE_SECONDS", timeouts()[1], minimum=0),
                   max_retry_after_seconds=max_retry_after())

    def delay(self, attempt: int, error: PsaError | None = None, rng: random.Random | None = None) -> float:
        """Delay after real failure number `attempt` (1-based; deferrals by our own limiter
        are not failures and do not count, see ClaimedJob.failure_no): exponential with
        "equal jitter" (half fixed, half random) so a burst of failures does not retry in
        step. A vendor Retry-After is a floor (asking sooner just earns another 429), up to
        max_retry_after_seconds. So is the settle time after a POST that may have been applied."""
        delay = jittered_delay(attempt, self.base_seconds, self.max_delay_seconds, factor=self.factor,
                               retry_after=error.retry_after if error is not None else None,
                               retry_after_cap=self.max_retry_after_seconds, rng=rng)
        if error is not None and post_may_have_landed(error):
            delay = max(delay, self.post_settle_seconds)
        return delay


def post_may_have_landed(error: PsaError) -> bool:
    """A failed POST of a note whose effect we cannot rule out: timeouts, resets, 5xx. A 429
    or a 409 is the PSA refusing before doing anything."""
    return (error.operation == "post_note" and error.retryable
            and not isinstance(error, (PsaRateLimited, PsaRecordBusy)))
