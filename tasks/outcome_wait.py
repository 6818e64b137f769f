"""Wait for a job's (or a preview's) outcome without polling.

On PostgreSQL the transaction that writes an outcome sends NOTIFY (models.notify); each
waiter subscribes to its row on this process's one LISTEN connection (outcome_listener) and
then reads the row. Reading *after* subscribing closes the race of a job that finishes
between a first read and the subscription: if the LISTEN was active when we read, any later
commit wakes us; if it was not, the listener wakes every waiter once it is. A waiter reads
again on every wake, and returns as soon as the row is terminal or the timeout passes (then
with the pending outcome: the web tier answers 202). While the listener is (re)connecting,
waiters re-read every DEGRADED_POLL_SECONDS so a long outage cannot hold them to the
timeout. On SQLite (the demo) there is no NOTIFY: waiters poll every POLL_SECONDS.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from models.db import get_engine
from models.notify import JOB_CHANNEL, PREVIEW_CHANNEL
from tasks import validation as v
from tasks.errors import RequestError
from tasks.outcome import PreviewOutcome, WritebackOutcome, outcome, preview_outcome
from tasks.outcome_listener import listener
from tasks.store import transient_db_error

POLL_SECONDS = 0.1  # SQLite only
DEGRADED_POLL_SECONDS = 1.0  # PostgreSQL while the listener has no connection
DEFAULT_TIMEOUT = 25.0  # below the usual 30 s proxy timeout: the endpoint still answers 202

T = TypeVar("T", WritebackOutcome, PreviewOutcome)


def wait_for_outcome(job_id: int, timeout: float = DEFAULT_TIMEOUT) -> WritebackOutcome:
    """The job's outcome as soon as it is terminal, or the pending one (202) at `timeout`
    seconds. A job already finished returns at once. NotFoundError for an unknown id,
    RequestError for one that is not an id or a timeout that is not a number."""
    return _wait(JOB_CHANNEL, v.positive_int(job_id, "job_id"), outcome, _timeout(timeout))


def wait_for_preview(preview_id: int, timeout: float = DEFAULT_TIMEOUT) -> PreviewOutcome:
    """The draft's markdown (succeeded) or failure reason (failed, superseded) as soon as it
    has one, or the pending outcome at `timeout`. NotFoundError for an unknown id."""
    return _wait(PREVIEW_CHANNEL, v.positive_int(preview_id, "preview_id"), preview_outcome, _timeout(timeout))


async def async_wait_for_outcome(job_id: int, timeout: float = DEFAULT_TIMEOUT) -> WritebackOutcome:
    """wait_for_outcome for asyncio frameworks: the event loop is never blocked (reads run
    in the loop's default executor; the listener thread wakes the task thread-safely)."""
    return await _async_wait(JOB_CHANNEL, v.positive_int(job_id, "job_id"), outcome, _timeout(timeout))


async def async_wait_for_preview(preview_id: int, timeout: float = DEFAULT_TIMEOUT) -> PreviewOutcome:
    return await _async_wait(PREVIEW_CHANNEL, v.positive_int(preview_id, "preview_id"), preview_outcome,
                             _timeout(timeout))


def _timeout(value: float) -> float:
    # bool is an int: True must not mean one second. NaN or inf would never time out.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"timeout must be a finite number of seconds, got {value!r:.40}", field="timeout")
    return max(float(value), 0.0)


def _postgres() -> bool:
    return get_engine().dialect.name == "postgresql"


def _read(read: Callable[[int], T], row_id: int) -> T:
    """One read; a connection the server dropped (the pool notices on use) is retried twice."""
    for attempt in range(3):
        try:
            return read(row_id)
        except Exception as err:
            if attempt == 2 or not transient_db_error(err):
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


class _ThreadWaker:
    def __init__(self) -> None:
        self.event = threading.Event()

    def wake(self) -> None:
        self.event.set()


def _wait(channel: str, row_id: int, read: Callable[[int], T], timeout: float) -> T:
    deadline = time.monotonic() + timeout
    if not _postgres():
        while True:
            current = _read(read, row_id)
            remaining = deadline - time.monotonic()
            if not current.pending or remaining <= 0:
                return current
            time.sleep(min(POLL_SECONDS, remaining))
    lst = listener()
    if not lst.listening():  # finished already? then no need to wait for a connection
        current = _read(read, row_id)
        if not current.pending or timeout <= 0:
            return current
    waker = _ThreadWaker()
    lst.subscribe(channel, row_id, waker)
    try:
        while True:
            waker.event.clear()  # before the read: a wake from here on means "read again"
            current = _read(read, row_id)
            remaining = deadline - time.monotonic()
            if not current.pending or remaining <= 0:
                return current
            waker.event.wait(remaining if lst.listening() else min(remaining, DEGRADED_POLL_SECONDS))
    finally:
        lst.unsubscribe(channel, row_id, waker)


class _AsyncWaker:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.event = asyncio.Event()

    def wake(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.event.set)
        except RuntimeError:  # the loop closed while we were subscribed: nobody to wake
            pass


async def _async_wait(channel: str, row_id: int, read: Callable[[int], T], timeout: float) -> T:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    async def read_now() -> Any:
        return await loop.run_in_executor(None, _read, read, row_id)

    if not _postgres():
        while True:
            current = await read_now()
            remaining = deadline - loop.time()
            if not current.pending or remaining <= 0:
                return current
            await asyncio.sleep(min(POLL_SECONDS, remaining))
    lst = listener()
    if not lst.listening():
        current = await read_now()
        if not current.pending or timeout <= 0:
            return current
    waker = _AsyncWaker(loop)
    lst.subscribe(channel, row_id, waker)
    try:
        while True:
            waker.event.clear()
            current = await read_now()
            remaining = deadline - loop.time()
            if not current.pending or remaining <= 0:
                return current
            wait = remaining if lst.listening() else min(remaining, DEGRADED_POLL_SECONDS)
            try:
                await asyncio.wait_for(waker.event.wait(), wait)
            except asyncio.TimeoutError:
                pass
    finally:
        lst.unsubscribe(channel, row_id, waker)
