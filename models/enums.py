"""State vocabularies. Stored by value (plain strings) so SQL readers see words."""
from __future__ import annotations

import enum


class JobKind(str, enum.Enum):
    RESOLVE = "resolve"
    ESCALATE = "escalate"
    POST_NOTE = "post_note"
    TRANSITION_STATUS = "transition_status"


class JobState(str, enum.Enum):
    QUEUED = "queued"  # waiting for its first run
    RUNNING = "running"  # claimed; lease_until says until when
    RETRYING = "retrying"  # a transient error; next_attempt_at says when
    SUCCEEDED = "succeeded"  # done; status verified, or no transition was asked for
    VERIFICATION_FAILED = "verification_failed"  # PSA answered OK but the re-read disagrees
    FAILED = "failed"  # permanent error, or retries exhausted
    CANCELLED = "cancelled"  # an operator cancelled it before it ran

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.VERIFICATION_FAILED, JobState.FAILED, JobState.CANCELLED})
CLAIMABLE_STATES = frozenset({JobState.QUEUED, JobState.RETRYING})


class NoteVisibility(str, enum.Enum):
    RESOLUTION = "resolution"  # customer-visible resolution note
    INTERNAL = "internal"  # internal analysis: never shown to the customer
    DISCUSSION = "discussion"  # customer-visible discussion note


class NoteState(str, enum.Enum):
    NONE = "none"  # no note in this job, or not attempted yet
    INTENT = "intent"  # a POST may have reached the PSA: reconcile before posting again
    POSTED = "posted"  # the PSA gave us its note id


class SessionStatus(str, enum.Enum):
    OPEN = "open"
    RESOLVED = "resolved"
    ESCALATED = "escalated"
    RESOLVED_LOCAL = "resolved_local"
    ESCALATED_LOCAL = "escalated_local"


class AttemptOutcome(str, enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    RETRY = "retry"
    FAILED = "failed"
    VERIFICATION_FAILED = "verification_failed"
    ABANDONED = "abandoned"  # the worker died mid-attempt; found by the next claim
    # Our own limiter said "not now" (cooldown after a 429, rate or in-flight cap): no HTTP
    # call, no attempt spent, and not a failure for the backoff (ClaimedJob.failure_no).
    DEFERRED = "deferred"
