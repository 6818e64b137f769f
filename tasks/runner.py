"""One execution of a writeback job: claim → note → status → verify → record.

Plain functions (no Celery here): tasks.writeback maps the returned Outcome onto Celery's
vocabulary (return, retry, raise). The database transactions are short and never span a
PSA call (STYLE habit 5).
"""
from __future__ import annotations

import logging
import random
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from models import AttemptOutcome, JobState, SessionStatus, utcnow
from models.crypto import ConfigurationError
from models.db import describe_error, is_db_error
from providers import REGISTRY, provider_for
from providers.errors import PsaAuthError, PsaError, PsaRateLimited
from providers.http import add_gate, add_observer
from tasks import events, ratelimit, steps, store
from tasks.enqueue import publish
from tasks.errors import LeaseLost, WorkerLost
from tasks.retry import RetryPolicy
from tasks.store import ClaimedJob, ClaimRefusal

log = logging.getLogger("psa_writeback.runner")
add_gate(ratelimit.gate)  # per-connection cooldown and token bucket before every PSA call
_running = threading.local()  # the job this thread is executing (PSA calls are synchronous)


def _count_psa_time(*, seconds: float, **_: Any) -> None:
    """The attempt row's psa_ms: the time this execution spent waiting on the PSA."""
    job = getattr(_running, "job", None)
    if job is not None:
        job.scratch["psa_seconds"] = job.scratch.get("psa_seconds", 0.0) + seconds


add_observer(_count_psa_time)

_DONE_STATUS = {"resolve": SessionStatus.RESOLVED, "escalate": SessionStatus.ESCALATED}
_LOCAL_STATUS = {"resolve": SessionStatus.RESOLVED_LOCAL, "escalate": SessionStatus.ESCALATED_LOCAL}
_LOCAL_MARKDOWN = {"resolve": "resolution_note_markdown", "escalate": "escalation_package_markdown"}


@dataclass
class Outcome:
    job_id: int
    # succeeded | verification_failed | failed | retry | skipped | waiting (for an in-flight
    # slot: no message waits for it, a release wakes it; see tasks.ratelimit)
    status: str
    message: str = ""
    delay: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)
    # The ticket's next live job, looked up in the outcome's own transaction (store.finish).
    next_on_ticket: tuple[int, str] | None = None


def execute(job_id: int | None, task_id: str | None = None, worker: str | None = None,
            policy: RetryPolicy | None = None, kind: str | None = None,
            create: Callable[[Connection], int] | None = None,
            on_claim: Callable[[int], None] | None = None) -> Outcome:
    """Claim and run job `job_id`, or the job `create` writes just before its claim (a task
    sent by name with the intent: store.claim). `on_claim(job id)` once the claim
    committed, claimed or refused, and before that once a job `create` wrote is committed."""
    token = uuid.uuid4().hex
    claimed = store.claim(job_id, token, task_id, worker, kind, create=create, on_created=on_claim)
    if on_claim is not None:
        on_claim(claimed.job_id if isinstance(claimed, ClaimRefusal) else claimed.id)
    if isinstance(claimed, ClaimRefusal):
        return _refused(claimed)
    job_id = claimed.id
    policy = policy or RetryPolicy.from_env()
    # The claim read account, provider and ticket already: the log context takes them from here.
    events.emit("job_claimed", job_id=job_id, account_id=claimed.account_id, provider=claimed.provider,
                ticket_id=claimed.ticket_id, attempt=claimed.attempt_no)
    log.info("claimed job %s attempt %s", job_id, claimed.attempt_no,
             extra={"job_id": job_id, "step": "claim", "attempt": claimed.attempt_no})
    try:
        if claimed.attempt_no > claimed.max_attempts:
            # Only executions that died without an outcome get here (a retry that would
            # exceed the limit fails instead of scheduling): a job that kills its worker
            # every time must end, not loop through the sweeper forever.
            return _fail(claimed, f"gave up after {claimed.attempt_no - 1} attempts: the last one ended without "
                                  "an outcome (worker killed or lost mid-attempt)", WorkerLost(), "claim")
        if claimed.setup_error is not None:
            return _fail(claimed, f"configuration error: {claimed.setup_error}",
                         ConfigurationError(claimed.setup_error), "claim")
        return _run(claimed, policy)
    except LeaseLost as err:
        log.warning("%s; stopping without further writes", err, extra={"job_id": job_id})
        return Outcome(job_id, "skipped", str(err))


def _refused(refusal: ClaimRefusal) -> Outcome:
    # Duplicate or early messages land here; they change nothing.
    messages = {"missing": "job row does not exist",
                "wrong_kind": f"job is a {refusal.state} job; send it to writeback.{refusal.state}", "terminal": f"job already {refusal.state}",
                "running": "job is running elsewhere", "blocked": "an earlier job for the same ticket is not finished",
                "not_due": f"job is not due for {refusal.due_in:.1f}s"}
    return Outcome(refusal.job_id, "skipped", messages[refusal.reason], delay=refusal.due_in,
                   result={"refused": refusal.reason})


def _run(job: ClaimedJob, policy: RetryPolicy) -> Outcome:
    if job.connection_id is None:
        return _finish_local(job)
    # A linked job without credentials has a setup_error and was failed before _run.
    assert job.credentials is not None
    # every PSA call below passes the connection's gate (cooldown after a 429, token bucket),
    # and the job holds one of the connection's in-flight slots for at most a lease (a dead
    # worker's slot frees itself when another execution may take the job over)
    limited = ratelimit.connection_key(job.connection_id, job.credentials.base_url)
    job.scratch["limit_key"] = limited
    calls = (2 if job.markdown is not None else 0) + (3 if job.target_status_id is not None else 0)
    # A PSA's own concurrency limit (Autotask: 3 requests at once) caps its jobs too, and
    # its calls per rolling hour (Autotask: 10,000, shared with the tenant's other integrations).
    vendor = REGISTRY.get(job.provider or "")
    cap = job.scratch["cap"] = ratelimit.inflight_cap(getattr(vendor, "max_concurrent_requests", None))
    hourly = ratelimit.hourly_limits(job.provider or "", getattr(vendor, "hourly_call_limit", None))
    slot = ratelimit.Slot()
    _running.job = job
    try:
        with ratelimit.counting_against(limited, calls=max(calls, 1), token=job.token,
                                        hold=store.job_lease_seconds(job), cap=cap, hourly=hourly, job=job.id,
                                        recount=True) as slot:
            return _run_calls(job, policy)
    finally:
        _running.job = None
        # also after LeaseLost or a database outage: the slot we gave back was handed on
        _wake(limited, slot.woken, cap)


def _wake(limited: str, woken: list[int], cap: int) -> None:
    """Wake the waiting jobs our release handed a slot to: make each due and publish it (at
    the highest priority: the slot waits for it). A woken job that is no longer waiting
    (finished, cancelled, or taken by the sweeper's re-publish meanwhile) hands its slot on.
    Nothing here may fail our own job, whose outcome is written: a wake-up that cannot be
    sent leaves the job to its recheck (PSA_INFLIGHT_RECHECK_SECONDS) and the sweeper."""
    if not woken:
        return  # every job passes here: nothing waited for its slot

    pending, handed = list(woken), 0
    while pending and handed < 50:  # bounded: each pass pops at most the cap's free slots
        job_id = pending.pop(0)
        handed += 1
        try:
            kind = store.wake(job_id)
        except Exception as err:
            log.warning("could not wake job %s waiting for an in-flight slot (%s); it comes back after its "
                        "recheck", job_id, describe_error(err), extra={"job_id": job_id})
            continue
        if kind is None:
            pending.extend(ratelimit.release(limited, "", cap, dropped=job_id))
            continue
        publish(job_id, kind, priority=0)
        log.info("woke job %s: an in-flight slot is free", job_id, extra={"job_id": job_id, "step": "wake"})


def _run_calls(job: ClaimedJob, policy: RetryPolicy) -> Outcome:
    step = "note"
    try:
        provider = provider_for(job.provider or "", job.credentials, job.options)
        note = None
        if job.markdown is not None:
            note = steps.post_note_once(
                provider, job,
                record_intent=lambda ids, watermark: store.record_note_intent(job, ids, watermark),
                record_posted=lambda ext, adopted: store.record_note_posted(job, ext, adopted))
            if note.earlier:
                log.info("note %s already on ticket %s (an earlier attempt's); not posted again", note.external_id,
                         job.ticket_id, extra={"job_id": job.id, "step": "post", "note_id": note.external_id})
            else:
                log.info("note %s on ticket %s", "adopted" if note.adopted else "posted", job.ticket_id,
                         extra={"job_id": job.id, "step": "post", "note_id": note.external_id})
        if job.target_status_id is None:
            return _finish_without_transition(job, note)
        step = "transition"
        assert job.ticket_id is not None
        store.renew_lease_if_aged(job)  # the note's intent renewed it a moment ago, usually
        transition = steps.transition_and_verify(provider, job.ticket_id, job.target_status_id)
        return _finish_transition(job, note, transition)
    except PsaError as err:
        return _psa_error(job, err, step, policy)
    except (ConfigurationError, ValueError) as err:
        return _fail(job, f"configuration error: {err}", err, step)
    except LeaseLost:
        raise
    except Exception as err:
        if store.transient_db_error(err):
            raise  # the database is away: the lease and the sweeper bring the job back
        if is_db_error(err):
            # Its text can quote the statement's values (the note's markdown, a whole row in
            # a DETAIL line): the message and the log name the error only. The outcome
            # write may be what failed, so the failure is recorded without the session's
            # columns (the note's id stays on the job row).
            what = describe_error(err)
            log.error("job %s: database error in the %s step: %s", job.id, step, what,
                      extra={"job_id": job.id, "step": step})
            return _fail(job, f"database error in the {step} step: {what} (its text is not recorded: it can "
                              "quote the note)", err, step, record_session=False)
        # A bug or a row no code path expects: retrying would fail the same way, so stop
        # now with the reason rather than loop until the attempts run out.
        log.exception("job %s: unexpected error in the %s step", job.id, step, extra={"job_id": job.id})
        return _fail(job, f"internal error in the {step} step: {type(err).__name__}: {err}", err, step)


def _note_result(note: steps.NoteResult | None) -> dict[str, Any] | None:
    return None if note is None else {"external_id": note.external_id, "adopted": note.adopted}


def _finish_local(job: ClaimedJob) -> Outcome:
    result = {"outcome": "local", "note": None, "status": None, "status_transition_skipped_reason":
              "no PSA is linked to the session; the markdown was stored locally"}
    session_values = {_LOCAL_MARKDOWN[job.kind]: job.markdown, "status": _LOCAL_STATUS[job.kind].value}
    store.finish(job, JobState.SUCCEEDED, AttemptOutcome.SUCCEEDED, result=result, session_values=session_values)
    return _done(job, JobState.SUCCEEDED, result)


def _finish_without_transition(job: ClaimedJob, note: steps.NoteResult | None) -> Outcome:
    reason = job.transition_skipped_reason
    result = {"outcome": "transition_skipped" if reason else "note_posted", "note": _note_result(note),
              "status": None, "status_transition_skipped_reason": reason}
    done = _DONE_STATUS.get(job.kind)
    store.finish(job, JobState.SUCCEEDED, AttemptOutcome.SUCCEEDED, result=result,
                 session_values={"status": done.value} if done else None)
    return _done(job, JobState.SUCCEEDED, result)


def _finish_transition(job: ClaimedJob, note: steps.NoteResult | None, t: steps.TransitionResult) -> Outcome:
    now = utcnow()
    status = {"expected_id": t.expected_id, "expected_name": t.expected_name, "observed_id": t.observed.status_id,
              "observed_name": t.observed.status_name, "patched": t.patched,
              "verified_at": now.isoformat() if t.verified else None}
    result = {"outcome": "verified" if t.verified else "verification_failed", "note": _note_result(note),
              "status": status, "status_transition_skipped_reason": None}
    columns = dict(expected_status_id=t.expected_id, expected_status_name=t.expected_name,
                   observed_status_id=t.observed.status_id, observed_status_name=t.observed.status_name,
                   status_patched=t.patched)
    if t.verified:
        session_values = {"psa_status_id": t.observed.status_id, "psa_status_name": t.observed.status_name,
                          "psa_status_verified_at": now}
        if done := _DONE_STATUS.get(job.kind):
            session_values["status"] = done.value
        store.finish(job, JobState.SUCCEEDED, AttemptOutcome.SUCCEEDED, result=result, session_values=session_values,
                     verified_at=now, **columns)
        return _done(job, JobState.SUCCEEDED, result)
    message = (f"ticket {job.ticket_id}: expected status {t.expected_id} ({t.expected_name or 'unknown name'}), "
               f"observed {t.observed.status_id} ({t.observed.status_name or 'unknown name'}) after the PSA "
               "accepted the change")
    store.finish(job, JobState.VERIFICATION_FAILED, AttemptOutcome.VERIFICATION_FAILED, result=result,
                 error=message, step="verify", **columns)
    return _done(job, JobState.VERIFICATION_FAILED, result, message)


def _psa_error(job: ClaimedJob, err: PsaError, step: str, policy: RetryPolicy) -> Outcome:
    if isinstance(err, ratelimit.Throttled):
        return _defer(job, err, step)
    long_wait: bool | None = None  # whether the PSA made us wait longer than the alert threshold
    if isinstance(err, PsaRateLimited) and job.scratch.get("limit_key"):
        # every worker backs off; of all the jobs hitting the same storm, Redis names one
        # as the one that made the cooldown long (None: Redis is away, judge by the reply)
        _left, long_wait = ratelimit.start_cooldown(job.scratch["limit_key"], err.retry_after)
    if isinstance(err, PsaAuthError):
        events.emit("psa_auth_failed", connection_id=job.connection_id, account_id=job.account_id,
                    provider=job.provider, job_id=job.id, ticket_id=job.ticket_id, message=str(err))
    if not err.retryable:
        return _fail(job, str(err), err, step)
    if job.attempt_no >= job.max_attempts:
        return _fail(job, f"gave up after {job.attempt_no} attempts; last error: {err}", err, step)
    # The exponent counts real failures: deferrals by our own limiter spent no attempt.
    delay = policy.delay(job.failure_no, err)
    store.schedule_retry(job, delay, err, err.status_code, step)
    log.warning("attempt %s of job %s failed (%s); retrying in %.1fs", job.attempt_no, job.id, err, delay,
                extra={"job_id": job.id, "step": step})
    events.emit("job_retry_scheduled", job_id=job.id, kind=job.kind, provider=job.provider,
                attempt=job.attempt_no, delay=delay, error_type=type(err).__name__)
    asked = err.retry_after if err.retry_after is not None else 0.0
    if isinstance(err, PsaRateLimited) and err.retry_after is None:
        asked = ratelimit.default_cooldown()
    if long_wait is None:
        long_wait = asked > ratelimit.long_deferral_after()
    if long_wait:
        _long_deferral(job, asked, ratelimit.capped_wait(asked),
                       f"the PSA answered HTTP {err.status_code} asking to wait {asked:.0f}s")
    return Outcome(job.id, "retry", str(err), delay=delay)


def _defer(job: ClaimedJob, err: PsaError, step: str) -> Outcome:
    """Our own limiter refused the call: come back when it allows, without spending an
    attempt (the attempt row stays, outcome "deferred", so the history shows the wait). A
    little jitter so a tenant's deferred jobs do not all return in the same instant. Never
    longer than PSA_MAX_RETRY_AFTER_SECONDS, whatever the limiter says."""
    wait = err.retry_after if err.retry_after is not None else ratelimit.default_cooldown()
    spread = ratelimit.hourly_spread(job.deferrals) if isinstance(err, ratelimit.HourlyLimitNear) else 0.0
    delay = ratelimit.capped_wait(wait + spread) + random.uniform(0, 0.5)
    waiting = isinstance(err, ratelimit.InflightCapReached)  # woken by a release: no message at `delay`
    store.schedule_retry(job, delay, err, None, step, spend_attempt=False, message=not waiting)
    log.info("job %s deferred %.1fs: %s", job.id, delay, err.message, extra={"job_id": job.id, "step": step})
    events.emit("job_retry_scheduled", job_id=job.id, kind=job.kind, provider=job.provider,
                attempt=job.attempt_no, delay=delay, error_type=type(err).__name__)
    if waiting:
        # Into the connection's waiting set, now that the row says retrying: a job leaving
        # wakes it with a message of its own. A countdown message too would be a second one
        # (and a stale one re-arms itself on every "not due" refusal), so none is sent; the
        # row's recheck is the safety net, not a wait the PSA imposes (no long_deferral alert).
        limited = job.scratch["limit_key"]
        _wake(limited, ratelimit.wait_for_slot(limited, job.id, job.scratch["cap"]), job.scratch["cap"])
        return Outcome(job.id, "waiting", str(err), delay=delay)
    # A cooldown's length was alerted on by the job whose 429 started it (see _psa_error), an
    # hourly pause's by the one job Redis named to announce it.
    announced = getattr(err, "announce", True)
    if not getattr(err, "cooling_down", False) and announced and delay > ratelimit.long_deferral_after():
        _long_deferral(job, wait, delay, f"our own limiter deferred it: {err.message}")
    return Outcome(job.id, "retry", str(err), delay=delay)


def _long_deferral(job: ClaimedJob, asked: float | None, seconds: float, why: str) -> None:
    events.emit("long_deferral", job_id=job.id, connection_id=job.connection_id, account_id=job.account_id,
                provider=job.provider, ticket_id=job.ticket_id, seconds=seconds, asked=asked,
                message=f"job {job.id} and its PSA connection {job.connection_id} wait {seconds:.0f}s: {why} "
                        f"(alert threshold LONG_DEFERRAL_ALERT_SECONDS={ratelimit.long_deferral_after():g}s, "
                        f"cap PSA_MAX_RETRY_AFTER_SECONDS={ratelimit.max_retry_after():g}s)")


def _fail(job: ClaimedJob, message: str, err: BaseException, step: str, *, record_session: bool = True) -> Outcome:
    result = {"outcome": "failed", "error": {"type": type(err).__name__, "message": message[:2000]}}
    store.finish(job, JobState.FAILED, AttemptOutcome.FAILED, result=result, error=(type(err).__name__, message),
                 step=step, http_status=getattr(err, "status_code", None), record_session=record_session)
    return _done(job, JobState.FAILED, result, message)


def _done(job: ClaimedJob, state: JobState, result: dict[str, Any], message: str = "") -> Outcome:
    events.emit("job_finished", job_id=job.id, kind=job.kind, state=state.value, result=result,
                error_message=message or None, provider=job.provider, account_id=job.account_id,
                ticket_id=job.ticket_id, connection_id=job.connection_id, attempts=job.attempt_no,
                open_alerts=job.scratch.get("open_alerts"))
    return Outcome(job.id, state.value, message, result=result, next_on_ticket=job.scratch.get("next"))
