"""Per-PSA-connection rate limiting, shared by every worker through Redis.

Four rules, all keyed by the connection (a tenant's PSA), never global:
- Cooldown: a 429 from the PSA sets `psa-writeback:cooldown:<connection id>:<url hash>` for its
  Retry-After (RATE_LIMIT_DEFAULT_COOLDOWN_SECONDS when it gives none), capped at
  PSA_MAX_RETRY_AFTER_SECONDS: the tenant's server chooses the value, and `Retry-After:
  99999999` must not park its jobs for years. Until it expires no worker calls that PSA: a
  job that would is deferred to the end of the cooldown without an HTTP call and without
  spending an attempt (runner), so a 429 storm slows that tenant alone and never turns into
  a retry storm.
- In-flight cap: at most PSA_MAX_INFLIGHT_PER_CONNECTION jobs of one connection run at once,
  across every worker process and host (a sorted set of job tokens scored by their lease
  deadline, so a slot of a worker that died mid-job frees itself when its lease would have
  expired). A slow or stalling PSA then holds that many threads, never the whole pool. A job
  over the cap joins the connection's waiting set (oldest first) and its message ends: the
  job row waits, retrying, with nothing in the broker. A job that leaves hands its slot to
  the oldest waiting job (the slot is kept for it) and the runner wakes that job (makes it
  due and publishes it). So a backlog behind a slow PSA costs a claim per job when it
  arrives and one per slot handed over, not a claim per job every few seconds. A waiting
  job's row is due again after PSA_INFLIGHT_RECHECK_SECONDS (300): should a wake-up be lost
  (a worker killed between the hand-over and the publish, Redis flushed), the sweeper
  re-publishes it then. 0 turns the cap off.
- Token bucket: at most PSA_RATE_LIMIT_PER_SECOND calls per second per connection
  (burst PSA_RATE_LIMIT_BURST). A job takes the tokens of all its calls at its first call
  (one Lua call per job, not per call: a Redis round trip per HTTP call was a tenth of a
  worker's time); its later calls pass, and a 429 among them still starts the cooldown. A
  short wait for tokens is slept; a longer one defers the job like a cooldown does. 0 turns
  the bucket off.

- Hourly calls: a PSA that allows so many calls per rolling hour (Autotask: 10,000 per
  database, shared with the tenant's other integrations; the provider's `hourly_call_limit`)
  has its connection's calls counted in Redis (60 per-minute counts in a hash, expiring when
  idle). We use at most <PROVIDER>_HOURLY_CALL_BUDGET of them (default 90%: headroom for the
  other integrations); above <PROVIDER>_HOURLY_SLOWDOWN_AT of that (0.8) the jobs are paced,
  the budget left spread over an hour (slower the nearer the budget), and at the budget they
  wait until the window's oldest minutes fall out. Both are deferrals like the ones above;
  one job per long pause announces it (long_deferral). Providers without a limit: no count.

Admission to all four is one Lua call per job (_GATE, tasks.ratelimit_scripts), at the
job's first PSA call; leaving the in-flight set (and handing the slot over) is one more,
when the job's calls are over (release).

Redis is RATE_LIMIT_REDIS_URL, else the broker when it is Redis; without Redis (the demo)
all four are off. If Redis fails, calls go ahead (fail open): the PSA's own 429s and the
retry policy still protect it, and a writeback is never stuck on its rate limiter.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from models import settings
from providers.errors import PsaRateLimited
from tasks.ratelimit_scripts import COOLDOWN as _COOLDOWN, GATE as _GATE, RELEASE as _RELEASE, WAIT as _WAIT

log = logging.getLogger("psa_writeback.ratelimit")

_local = threading.local()
_client_lock = threading.Lock()
_clients: dict[str, Any] = {}
_failed_at = 0.0


class Throttled(PsaRateLimited):
    """Our own limiter said "not now" (no HTTP call was made): the job is deferred to
    `retry_after` without spending an attempt."""

    cooling_down = False  # deferred by a 429's cooldown (whoever got that 429 raised any alert)


class CoolingDown(Throttled):
    """The connection answered 429 a moment ago: wait out its Retry-After."""

    cooling_down = True


class InflightCapReached(Throttled):
    """PSA_MAX_INFLIGHT_PER_CONNECTION jobs of this connection are running already: the job
    is in the connection's waiting set; a job leaving wakes it (retry_after is only the
    safety net's recheck, inflight_recheck())."""


class HourlyLimitNear(Throttled):
    """The connection's calls in the rolling hour are in the slowdown band or at the budget:
    `announce` is set on the one job of a long pause that raises its `long_deferral` alert."""

    announce = False


class HourlySlowdown(HourlyLimitNear):
    """Above the slowdown share of the hourly budget: the connection's jobs are paced, the
    slower the nearer the budget."""


class HourlyBudgetReached(HourlyLimitNear):
    """At the hourly budget: nothing until enough of the window's oldest calls fall out."""


def connection_key(connection_id: int, base_url: str) -> str:
    """What the limits count against: the connection, at its current endpoint (a connection
    moved to another PSA URL starts with a clean slate)."""
    return f"{connection_id}:{hashlib.sha256(base_url.encode()).hexdigest()[:12]}"


def rate_per_second() -> float:
    return settings.number("PSA_RATE_LIMIT_PER_SECOND", 500, minimum=0)


def burst() -> float:
    return settings.number("PSA_RATE_LIMIT_BURST", max(rate_per_second(), 1.0), minimum=0)


def max_wait() -> float:
    """The longest a worker thread sleeps for a token before deferring the job instead."""
    return settings.number("PSA_RATE_LIMIT_MAX_WAIT_SECONDS", 2, minimum=0)


def default_cooldown() -> float:
    return settings.number("RATE_LIMIT_DEFAULT_COOLDOWN_SECONDS", 5, minimum=0)


def max_inflight() -> int:
    """Jobs of one connection running at once, across all workers (0: no cap)."""
    return settings.integer("PSA_MAX_INFLIGHT_PER_CONNECTION", 8)


def inflight_cap(vendor_limit: int | None = None) -> int:
    """The in-flight cap for a connection whose PSA allows at most `vendor_limit` requests at
    once (Autotask: 3 per integration; None: no such limit). A job's calls are sequential,
    so capping jobs caps requests; the vendor's limit applies even with our own cap off."""
    ours = max_inflight()
    if not vendor_limit:
        return ours
    return vendor_limit if ours <= 0 else min(ours, vendor_limit)


def hourly_window() -> float:
    """The rolling window of an hourly call limit (shorter only in tests)."""
    return max(_number("PSA_HOURLY_WINDOW_SECONDS", 3600), 1.0)


def hourly_limits(provider: str, vendor_limit: int | None = None) -> tuple[int, int]:
    """(calls per rolling window we use at most, calls from which we slow down) for a
    connection whose PSA allows `vendor_limit` calls per hour, shared with the tenant's other
    integrations (Autotask: 10,000 per database); (0, 0) when it has no such limit. The
    budget is <PROVIDER>_HOURLY_CALL_BUDGET (default 90% of the vendor's, never above it), the
    slowdown from the share <PROVIDER>_HOURLY_SLOWDOWN_AT of the budget (default 0.8)."""
    if not vendor_limit:
        return 0, 0
    prefix = provider.upper()
    budget = max(1, min(int(_number(f"{prefix}_HOURLY_CALL_BUDGET", vendor_limit * 9 // 10)), vendor_limit))
    share = _number(f"{prefix}_HOURLY_SLOWDOWN_AT", 0.8)
    return budget, max(0, min(int(budget * share), budget))


def _number(name: str, default: float) -> float:
    """A numeric setting; a value that is not a number is named in an error log and the
    default used: a typo in the worker's environment must not fail every tenant's jobs."""
    raw = os.environ.get(name)
    try:
        value = default if raw is None or raw.strip() == "" else float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # "nan" and "inf" parse, and would break every job's limits
        log.error("setting %s=%r is not a number; using %g", name, raw, default)
        return default
    return value


def hourly_spread(deferrals: int = 0) -> float:
    """Jitter added to an hourly deferral, growing with the job's earlier deferrals up to a
    minute: a backlog held at the budget comes back spread out, not all at the instant the
    window frees (only a few of them would fit then; the rest would be claimed for nothing)."""
    return random.uniform(0, min(2.0 ** max(deferrals, 0), 60.0))


def max_retry_after() -> float:
    """The longest a PSA's Retry-After (or any deferral) may hold a job or a connection: the
    value comes from the tenant's server, so it is never trusted as is."""
    return settings.number("PSA_MAX_RETRY_AFTER_SECONDS", 900, minimum=0)


def long_deferral_after() -> float:
    """A cooldown or deferral the PSA imposes beyond this raises one `long_deferral` alert."""
    return settings.number("LONG_DEFERRAL_ALERT_SECONDS", 600, minimum=0)


def capped_wait(seconds: float) -> float:
    return max(0.0, min(seconds, max_retry_after()))


def inflight_recheck() -> float:
    """When a job waiting for an in-flight slot is due again should no wake-up come: a
    release wakes it as soon as a slot is free, so this is only the safety net (the sweeper
    re-publishes a due job whose message is gone). Short values bring back the churn the
    waiting set removed (a claim per waiting job per period); jittered by up to a tenth."""
    base = max(_number("PSA_INFLIGHT_RECHECK_SECONDS", 300), 1.0)
    return base + random.uniform(0, base / 10)


# A slot handed to a woken job is kept for it this long: its wake-up message is published at
# the highest priority, so it normally comes within a second; one that never comes (the
# waker died before publishing) frees the slot when this runs out.
WOKEN_SLOT_HOLD = 120.0
# The waiting set goes when no job has joined it for this long (its jobs come back through
# the sweeper by then, and join again if the connection is still full).
WAITING_TTL_MS = 3600 * 1000


def _url() -> str | None:
    url = os.environ.get("RATE_LIMIT_REDIS_URL") or os.environ.get("CELERY_BROKER_URL", "")
    return url if url.startswith(("redis://", "rediss://", "unix://")) else None


def _redis() -> Any:
    url = _url()
    if url is None or time.monotonic() - _failed_at < 5:
        return None
    with _client_lock:
        client = _clients.get(url)
        if client is None:
            import redis

            pool = redis.BlockingConnectionPool.from_url(
                url, max_connections=settings.integer("WORKER_CONCURRENCY", 32, positive=True) + 4, timeout=1,
                socket_timeout=0.5, socket_connect_timeout=0.5)
            client = redis.Redis(connection_pool=pool)
            client._pswb_scripts = (client.register_script(_GATE), client.register_script(_COOLDOWN),
                                    client.register_script(_RELEASE), client.register_script(_WAIT))
            _clients[url] = client
        return client


def _key(kind: str, connection: str) -> str:
    return f"{os.environ.get('CELERY_REDIS_KEY_PREFIX', '')}psa-writeback:{kind}:{connection}"


def _guard(default: Any):
    def wrap(fn):
        def inner(*args: Any, **kwargs: Any) -> Any:
            global _failed_at
            try:
                return fn(*args, **kwargs)
            except Throttled:
                raise
            except Exception as err:  # Redis away: fail open, try again in a few seconds
                _failed_at = time.monotonic()
                log.warning("rate limiter unavailable (%s); calling the PSA unthrottled", type(err).__name__)
                return default
        return inner
    return wrap


@_guard(0.0)
def cooldown_left(connection: str) -> float:
    client = _redis()
    if client is None:
        return 0.0
    return max(client.pttl(_key("cooldown", connection)), 0) / 1000


@_guard((0.0, None))
def start_cooldown(connection: str, seconds: float | None) -> tuple[float, bool | None]:
    """A 429 from this connection's PSA: nobody calls it for `seconds` (its Retry-After),
    capped at max_retry_after(). Returns the cooldown left and whether this call made it
    longer than long_deferral_after() (None: Redis is away, nobody knows)."""
    client = _redis()
    if client is None:
        return 0.0, None
    asked = seconds if seconds is not None else default_cooldown()
    ms = max(int(capped_wait(asked) * 1000), 1)
    left, made_long = client._pswb_scripts[1](keys=[_key("cooldown", connection)],
                                              args=[ms, int(long_deferral_after() * 1000)])
    log.warning("PSA connection %s answered 429: calls paused for %.1fs%s", connection, int(left) / 1000,
                f" (it asked for {asked:g}s; PSA_MAX_RETRY_AFTER_SECONDS caps it)" if asked * 1000 > ms else "")
    return int(left) / 1000, bool(made_long)


def admit(connection: str, cost: int = 1, token: str | None = None, hold: float = 0.0,
          cap: int | None = None, hourly: tuple[int, int] = (0, 0), job: int | None = None) -> tuple[str, float]:
    """Take `cost` calls' tokens and, with a job `token`, one of the connection's in-flight
    slots for at most `hold` seconds; with an `hourly` (budget, slowdown from) limit, count the
    calls in the connection's rolling window. Returns ("go", seconds to wait first),
    ("cooldown", seconds left), ("full", 0), ("hourly", seconds until the window has room)
    or ("slowdown", seconds until the band's pace allows): nothing taken in the last four
    cases, nor when the wait would be longer than max_wait(). With a `job` id, a slot a release
    kept for that job is its own (after "full", the caller defers the job, then wait_for_slot)."""
    kind, seconds, _announce, _used = _admit(connection, cost, token, hold, cap, hourly, job)
    return kind, seconds


@_guard(("go", 0.0, False, 0))
def _admit(connection: str, cost: int, token: str | None, hold: float, cap: int | None,
           hourly: tuple[int, int], job: int | None = None, now: float | None = None) -> tuple[str, float, bool, int]:
    client = _redis()
    if client is None:
        return "go", 0.0, False, 0
    cap = (max_inflight() if cap is None else cap) if token else 0
    kind, ms, announce, used = client._pswb_scripts[0](
        keys=[_key("cooldown", connection), _key("bucket", connection), _key("inflight", connection),
              _key("hourly", connection), _key("waiting", connection)],
        args=[rate_per_second(), burst(), time.time() if now is None else now, max_wait(), cost, cap, token or "", hold,
              hourly[0], hourly[1], hourly_window(), long_deferral_after(), "" if job is None else str(job)])
    kinds = {0: "go", 1: "cooldown", 2: "full", 3: "hourly", 4: "slowdown"}
    return kinds[int(kind)], int(ms) / 1000, bool(announce), int(used)


def take_token(connection: str, cost: int = 1) -> float:
    """Take `cost` calls' tokens (no in-flight slot). Returns the seconds to wait first (0: go
    now), or minus the seconds of cooldown left when the connection is cooling down."""
    kind, seconds = admit(connection, cost)
    return -seconds if kind == "cooldown" else seconds


@_guard([])
def release(connection: str, token: str, cap: int | None = None, *, dropped: int | None = None,
            recount: tuple[int, float] = (0, 0.0)) -> list[int]:
    """The job's PSA calls are over: its in-flight slot goes to the oldest waiting job (and
    any other free slot too: one a dead worker's lease freed, one kept for a woken job that
    never came), kept for it for WOKEN_SLOT_HOLD. Returns those jobs' ids, oldest first: the
    caller wakes them (runner._wake). `dropped`: a woken job that turned out not to need its
    kept slot (finished or gone meanwhile); its slot is handed on the same way. `recount`:
    (calls made minus calls charged at admission, the admission's time) for a PSA with an
    hourly limit, so its window counts the calls really made (a picklist load, a second page
    of notes), in the same round trip."""
    client = _redis()
    if client is None:
        return []
    cap = max_inflight() if cap is None else cap
    width = hourly_window() / 60 if recount[0] else 60.0  # the minute only matters to a recount
    woken = client._pswb_scripts[2](
        keys=[_key("inflight", connection), _key("waiting", connection), _key("hourly", connection)],
        args=[token, time.time(), cap, WOKEN_SLOT_HOLD, "" if dropped is None else str(dropped),
              recount[0], math.floor(recount[1] / width), math.ceil(61 * width * 1000)])
    return [int(w) for w in woken]


@_guard([])
def wait_for_slot(connection: str, job: int, cap: int | None = None) -> list[int]:
    """Job `job`, refused a slot ("full") and deferred (its row says retrying), joins the
    connection's waiting set; a job that asks again keeps its place. Returns the ids of the
    waiting jobs (this one, possibly) handed a slot that freed meanwhile: the caller wakes
    them, as after a release. Called only once the deferral is written, so a release that
    wakes the job finds it waiting, never still running."""
    client = _redis()
    if client is None:
        return []
    cap = max_inflight() if cap is None else cap
    woken = client._pswb_scripts[3](keys=[_key("inflight", connection), _key("waiting", connection)],
                                    args=[str(job), time.time(), cap, WOKEN_SLOT_HOLD, WAITING_TTL_MS])
    return [int(w) for w in woken]


class Slot:
    """What counting_against leaves behind: the jobs its release woke (their ids)."""

    def __init__(self) -> None:
        self.woken: list[int] = []


@dataclass
class _Block:
    """One counting_against block's state, for the gate its thread's PSA calls pass."""
    connection: str
    cost: int  # the calls charged at admission (the job's expected number)
    token: str | None
    hold: float
    cap: int
    hourly: tuple[int, int]
    job: int | None
    recount: bool
    admitted_at: float | None = None  # when the first call was admitted (None: not yet)
    calls: int = 0  # calls made since


@contextlib.contextmanager
def counting_against(connection: str | None, calls: int = 1, *, token: str | None = None,
                     hold: float = 0.0, cap: int | None = None,
                     hourly: tuple[int, int] = (0, 0), job: int | None = None,
                     recount: bool = False) -> Iterator[Slot]:
    """PSA calls made by this thread inside the block count against `connection`: the first
    one passes the gate for `calls` calls (the job's expected number), the others go. With
    a job `token`, the first call also takes one of the connection's in-flight slots, for at
    most `hold` seconds (the job's lease: a slot of a worker that died mid-job frees itself
    when another execution may take the job over); leaving the block gives it back. `cap`
    overrides PSA_MAX_INFLIGHT_PER_CONNECTION for this connection (inflight_cap); `hourly`
    is its PSA's (budget, slowdown from) calls per rolling hour (hourly_limits). With the
    `job` id, a slot a release kept for that job is its own, and the yielded Slot's `woken`
    names the waiting jobs this block's release handed a slot to. With
    `recount` (the runner's jobs), leaving the block corrects the hourly window from the
    calls expected to the calls made."""
    previous = getattr(_local, "block", None)
    block = None if connection is None else _Block(connection, calls, token, hold,
                                                   max_inflight() if cap is None else cap, hourly, job, recount)
    _local.block = block
    slot = Slot()
    try:
        yield slot
    finally:
        _local.block = previous
        if block is not None and block.admitted_at is not None:
            holds_slot = block.token is not None and block.cap > 0
            delta = block.calls - block.cost if block.recount and block.hourly[0] > 0 else 0
            if holds_slot or delta:
                slot.woken = release(block.connection, block.token if holds_slot else "",
                                     block.cap if holds_slot else 0, recount=(delta, block.admitted_at))


def _hourly_refusal(provider: str, operation: str, connection: str, kind: str, wait: float, announce: bool,
                    used: int, hourly: tuple[int, int]) -> None:
    budget, slow_from = hourly
    limit = f"{provider.upper()}_HOURLY_CALL_BUDGET={budget}"
    if kind == "hourly":
        err: HourlyLimitNear = HourlyBudgetReached(
            f"{provider} connection {connection} made {used} calls in the last {hourly_window():g}s, its "
            f"hourly budget ({limit}): waiting {wait:.0f}s for the window to free", retry_after=wait,
            operation=operation)
    else:
        err = HourlySlowdown(
            f"{provider} connection {connection} made {used} calls in the last {hourly_window():g}s, above "
            f"{slow_from} ({provider.upper()}_HOURLY_SLOWDOWN_AT of {limit}): slowing down, next job in "
            f"{wait:.1f}s", retry_after=wait, operation=operation)
    err.announce = announce
    raise err


def gate(provider: str, operation: str) -> None:
    """Called before every PSA call (providers.http): wait for the connection's cooldown, an
    in-flight slot and a token, or raise Throttled when that would take longer than
    max_wait()."""
    block: _Block | None = getattr(_local, "block", None)
    if block is None or block.cost <= 0:
        return
    if block.admitted_at is not None:
        block.calls += 1  # admitted: the job's other calls pass (and are counted for the recount)
        return
    now = time.time()
    kind, wait, announce, used = _admit(block.connection, block.cost, block.token, block.hold, block.cap,
                                        block.hourly, block.job, now)
    connection, cap = block.connection, block.cap
    if kind in ("hourly", "slowdown"):
        _hourly_refusal(provider, operation, connection, kind, wait, announce, used, block.hourly)
    if kind == "cooldown":
        raise CoolingDown(f"{provider} connection {connection} is cooling down after a 429",
                          retry_after=wait, operation=operation)
    if kind == "full":
        raise InflightCapReached(f"{provider} connection {connection} has {cap} jobs in flight "
                                 "(PSA_MAX_INFLIGHT_PER_CONNECTION, or the PSA's own limit); waiting for one "
                                 "to finish", retry_after=inflight_recheck(), operation=operation)
    if wait > max_wait():
        raise Throttled(f"{provider} connection {connection} is over its rate limit "
                        f"({rate_per_second():g}/s)", retry_after=wait, operation=operation)
    block.admitted_at, block.calls = now, 1
    if wait > 0:
        time.sleep(wait)
