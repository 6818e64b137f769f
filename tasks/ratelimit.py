"""Per-PSA-connection rate limiting, shared by every worker through Redis.

Three rules, all keyed by the connection (a tenant's PSA), never global:
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
  expired). A slow or stalling PSA then holds that many threads, never the whole pool; a job
  over the cap is deferred like a cooldown deferral, for a short while that grows with its
  earlier deferrals (inflight_retry_delay). 0 turns it off.
- Token bucket: at most PSA_RATE_LIMIT_PER_SECOND calls per second per connection
  (burst PSA_RATE_LIMIT_BURST). A job takes the tokens of all its calls at its first call
  (one Lua call per job, not per call: a Redis round trip per HTTP call was a tenth of a
  worker's time); its later calls pass, and a 429 among them still starts the cooldown. A
  short wait for tokens is slept; a longer one defers the job like a cooldown does. 0 turns
  the bucket off.

Admission to all three is one Lua call per job (_GATE), at the job's first PSA call;
leaving the in-flight set is one more, when the job's calls are over (release).

Redis is RATE_LIMIT_REDIS_URL, else the broker when it is Redis; without Redis (the demo)
all three are off. If Redis fails, calls go ahead (fail open): the PSA's own 429s and the
retry policy still protect it, and a writeback is never stuck on its rate limiter.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

from providers.errors import PsaRateLimited

log = logging.getLogger("psa_writeback.ratelimit")

_local = threading.local()
_client_lock = threading.Lock()
_clients: dict[str, Any] = {}
_failed_at = 0.0

# KEYS[1] cooldown, KEYS[2] bucket, KEYS[3] in-flight set, KEYS[4] hourly counts; ARGV rate/s, burst,
# now (s), longest wait (s), tokens, in-flight cap, job token ('' = no cap check), seconds a slot is
# held at most, hourly budget (0 = none), calls from which to slow down, window (s), alert
# threshold (s). One round trip per job. Returns {kind, ms, announce, calls in the window}:
# kind 1 while cooling down, 2 when the connection has `cap` jobs in flight, 3 at its hourly
# budget (ms: until enough of the window's oldest minutes fall out), 4 in the slowdown band
# before it (ms: until the band's pace allows the next job), else 0 (ms to wait for the
# tokens; 0: taken; rate 0: off); a job that will wait no longer than ARGV[4] is admitted,
# takes its in-flight slot and counts its calls in the window. announce is 1 for the one
# job of a long hourly pause that should say so (one `long_deferral` alert per pause).
_GATE = """
local cool = redis.call('PTTL', KEYS[1])
if cool > 0 then return {1, cool, 0, 0} end
local now, cap, token = tonumber(ARGV[3]), tonumber(ARGV[6]), ARGV[7]
local capped = cap > 0 and token ~= ''
if capped then
  -- slots whose holder's lease ran out (a worker that died mid-job) are free again
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZSCORE', KEYS[3], token) == false and redis.call('ZCARD', KEYS[3]) >= cap then
    return {2, 0, 0, 0}
  end
end
local budget, used, pace, minute, width = tonumber(ARGV[9]), 0, 0, 0, 0
if budget > 0 then
  -- a rolling window of 60 minute counts (field = minute number); 'next' is when the
  -- slowdown band lets the next job in, 'alerted' until when a long pause was announced
  local window = tonumber(ARGV[11])
  width = window / 60
  minute = math.floor(now / width)
  local fields = redis.call('HGETALL', KEYS[4])
  local minutes, counts, nextat, alerted = {}, {}, 0, 0
  for i = 1, #fields, 2 do
    local f, v = fields[i], tonumber(fields[i + 1])
    if f == 'next' then nextat = v
    elseif f == 'alerted' then alerted = v
    elseif tonumber(f) <= minute - 60 then redis.call('HDEL', KEYS[4], f)
    else
      used = used + v
      minutes[#minutes + 1] = tonumber(f)
      counts[tonumber(f)] = v
    end
  end
  local cost = math.min(tonumber(ARGV[5]), budget)
  local kind, wait = 0, 0
  if used + cost > budget then
    -- wait until the oldest minutes falling out of the window leave room for this job
    table.sort(minutes)
    local freed = 0
    for _, m in ipairs(minutes) do
      freed = freed + counts[m]
      if used + cost - freed <= budget then wait = (m + 60) * width - now break end
    end
    kind = 3
  elseif used + cost > tonumber(ARGV[10]) and now < nextat then
    kind, wait = 4, nextat - now
  end
  if kind > 0 then
    local announce = 0
    if wait > tonumber(ARGV[12]) and alerted < now then
      announce = 1
      redis.call('HSET', KEYS[4], 'alerted', string.format('%.3f', now + wait))
    end
    return {kind, math.ceil(wait * 1000), announce, used}
  end
  -- in the band, the budget left is spread over a window: the nearer the budget, the slower
  -- (never longer than the window: by then every call counted now has fallen out)
  if used + cost > tonumber(ARGV[10]) then pace = math.min(cost * window / math.max(budget - used - cost, 1), window) end
end
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local wait = 0
if rate > 0 then
  local state = redis.call('HMGET', KEYS[2], 'tokens', 'at')
  local tokens, at = tonumber(state[1]) or burst, tonumber(state[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
  -- A caller that will sleep for its token takes it now (the bucket goes into debt), so the
  -- next caller queues behind it; one that would wait longer than ARGV[4] takes nothing.
  local cost = math.min(tonumber(ARGV[5]), burst)
  if tokens < cost then wait = math.ceil((cost - tokens) / rate * 1000) end
  if wait <= tonumber(ARGV[4]) * 1000 then tokens = tokens - cost end
  redis.call('HSET', KEYS[2], 'tokens', tokens, 'at', now)
  redis.call('PEXPIRE', KEYS[2], math.ceil(burst / rate * 1000) + 1000)
end
if wait <= tonumber(ARGV[4]) * 1000 then
  if capped then
    local hold = tonumber(ARGV[8])
    redis.call('ZADD', KEYS[3], string.format('%.3f', now + hold), token)
    -- the set outlives its newest slot by a second, then goes when idle
    local ttl = math.ceil(hold * 1000) + 1000
    if redis.call('PTTL', KEYS[3]) < ttl then redis.call('PEXPIRE', KEYS[3], ttl) end
  end
  if budget > 0 then
    used = used + tonumber(ARGV[5])
    redis.call('HINCRBY', KEYS[4], minute, tonumber(ARGV[5]))
    if pace > 0 then redis.call('HSET', KEYS[4], 'next', string.format('%.3f', now + pace)) end
    -- the counts outlive their newest minute by the window, then go when idle
    redis.call('PEXPIRE', KEYS[4], math.ceil(61 * width * 1000))
  end
end
return {0, wait, 0, used}
"""
# KEYS[1] cooldown; ARGV ms, alert threshold ms. Never shortens a longer cooldown another
# worker set. Returns {ms left, 1 if this call made the cooldown longer than the threshold}:
# of many workers hitting the same 429 storm, exactly one hears "you made it long".
_COOLDOWN = """
local left = redis.call('PTTL', KEYS[1])
local ms = tonumber(ARGV[1])
if left < ms then redis.call('SET', KEYS[1], '1', 'PX', ms) end
local made_long = 0
if left <= tonumber(ARGV[2]) and ms > tonumber(ARGV[2]) then made_long = 1 end
return {math.max(left, ms), made_long}
"""
_RELEASE = "return redis.call('ZREM', KEYS[1], ARGV[1])"


class Throttled(PsaRateLimited):
    """Our own limiter said "not now" (no HTTP call was made): the job is deferred to
    `retry_after` without spending an attempt."""

    cooling_down = False  # deferred by a 429's cooldown (whoever got that 429 raised any alert)


class CoolingDown(Throttled):
    """The connection answered 429 a moment ago: wait out its Retry-After."""

    cooling_down = True


class InflightCapReached(Throttled):
    """PSA_MAX_INFLIGHT_PER_CONNECTION jobs of this connection are running already."""


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
    return float(os.environ.get("PSA_RATE_LIMIT_PER_SECOND", "500"))


def burst() -> float:
    return float(os.environ.get("PSA_RATE_LIMIT_BURST", str(max(rate_per_second(), 1.0))))


def max_wait() -> float:
    """The longest a worker thread sleeps for a token before deferring the job instead."""
    return float(os.environ.get("PSA_RATE_LIMIT_MAX_WAIT_SECONDS", "2"))


def default_cooldown() -> float:
    return float(os.environ.get("RATE_LIMIT_DEFAULT_COOLDOWN_SECONDS", "5"))


def max_inflight() -> int:
    """Jobs of one connection running at once, across all workers (0: no cap)."""
    return int(os.environ.get("PSA_MAX_INFLIGHT_PER_CONNECTION", "8"))


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
    return float(os.environ.get("PSA_HOURLY_WINDOW_SECONDS", "3600"))


def hourly_limits(provider: str, vendor_limit: int | None = None) -> tuple[int, int]:
    """(calls per rolling window we use at most, calls from which we slow down) for a
    connection whose PSA allows `vendor_limit` calls per hour, shared with the tenant's other
    integrations (Autotask: 10,000 per database); (0, 0) when it has no such limit. The
    budget is <PROVIDER>_HOURLY_CALL_BUDGET (default 90% of the vendor's, never above it), the
    slowdown from the share <PROVIDER>_HOURLY_SLOWDOWN_AT of the budget (default 0.8)."""
    if not vendor_limit:
        return 0, 0
    prefix = provider.upper()
    budget = int(os.environ.get(f"{prefix}_HOURLY_CALL_BUDGET", str(vendor_limit * 9 // 10)))
    budget = max(1, min(budget, vendor_limit))
    share = float(os.environ.get(f"{prefix}_HOURLY_SLOWDOWN_AT", "0.8"))
    return budget, max(0, min(int(budget * share), budget))


def hourly_spread(deferrals: int = 0) -> float:
    """Jitter added to an hourly deferral, growing with the job's earlier deferrals up to a
    minute: a backlog held at the budget comes back spread out, not all at the instant the
    window frees (only a few of them would fit then; the rest would be claimed for nothing)."""
    return random.uniform(0, min(2.0 ** max(deferrals, 0), 60.0))


def max_retry_after() -> float:
    """The longest a PSA's Retry-After (or any deferral) may hold a job or a connection: the
    value comes from the tenant's server, so it is never trusted as is."""
    return float(os.environ.get("PSA_MAX_RETRY_AFTER_SECONDS", "900"))


def long_deferral_after() -> float:
    """A cooldown or deferral the PSA imposes beyond this raises one `long_deferral` alert."""
    return float(os.environ.get("LONG_DEFERRAL_ALERT_SECONDS", "600"))


def capped_wait(seconds: float) -> float:
    return max(0.0, min(seconds, max_retry_after()))


def inflight_retry_delay(deferrals: int = 0) -> float:
    """How long a job over the in-flight cap waits before asking again: short at first (a
    slot frees as soon as one of the connection's running jobs ends), then doubling with the
    job's earlier deferrals up to 30 s, jittered: a tenant with thousands of jobs queued
    behind a slow PSA must not keep the workers busy claiming and deferring them every second."""
    ceiling = min(2.0 ** max(deferrals, 0), 30.0)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


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
                url, max_connections=int(os.environ.get("WORKER_CONCURRENCY", "32")) + 4, timeout=1,
                socket_timeout=0.5, socket_connect_timeout=0.5)
            client = redis.Redis(connection_pool=pool)
            client._pswb_scripts = (client.register_script(_GATE), client.register_script(_COOLDOWN),
                                    client.register_script(_RELEASE))
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
          cap: int | None = None, hourly: tuple[int, int] = (0, 0)) -> tuple[str, float]:
    """Take `cost` calls' tokens and, with a job `token`, one of the connection's in-flight
    slots for at most `hold` seconds; with an `hourly` (budget, slowdown from) limit, count the
    calls in the connection's rolling window. Returns ("go", seconds to wait first),
    ("cooldown", seconds left), ("full", 0), ("hourly", seconds until the window has room)
    or ("slowdown", seconds until the band's pace allows): nothing taken in the last four
    cases, nor when the wait would be longer than max_wait()."""
    kind, seconds, _announce, _used = _admit(connection, cost, token, hold, cap, hourly)
    return kind, seconds


@_guard(("go", 0.0, False, 0))
def _admit(connection: str, cost: int, token: str | None, hold: float, cap: int | None,
           hourly: tuple[int, int]) -> tuple[str, float, bool, int]:
    client = _redis()
    if client is None:
        return "go", 0.0, False, 0
    cap = (max_inflight() if cap is None else cap) if token else 0
    kind, ms, announce, used = client._pswb_scripts[0](
        keys=[_key("cooldown", connection), _key("bucket", connection), _key("inflight", connection),
              _key("hourly", connection)],
        args=[rate_per_second(), burst(), time.time(), max_wait(), cost, cap, token or "", hold,
              hourly[0], hourly[1], hourly_window(), long_deferral_after()])
    kinds = {0: "go", 1: "cooldown", 2: "full", 3: "hourly", 4: "slowdown"}
    return kinds[int(kind)], int(ms) / 1000, bool(announce), int(used)


def take_token(connection: str, cost: int = 1) -> float:
    """Take `cost` calls' tokens (no in-flight slot). Returns the seconds to wait first (0: go
    now), or minus the seconds of cooldown left when the connection is cooling down."""
    kind, seconds = admit(connection, cost)
    return -seconds if kind == "cooldown" else seconds


@_guard(None)
def release(connection: str, token: str) -> None:
    """The job's PSA calls are over: its in-flight slot is free for the next job."""
    client = _redis()
    if client is not None:
        client._pswb_scripts[2](keys=[_key("inflight", connection)], args=[token])


@contextlib.contextmanager
def counting_against(connection: str | None, calls: int = 1, *, token: str | None = None,
                     hold: float = 0.0, cap: int | None = None,
                     hourly: tuple[int, int] = (0, 0)) -> Iterator[None]:
    """PSA calls made by this thread inside the block count against `connection`: the first
    one passes the gate for `calls` calls (the job's expected number), the others go. With
    a job `token`, the first call also takes one of the connection's in-flight slots, for at
    most `hold` seconds (the job's lease: a slot of a worker that died mid-job frees itself
    when another execution may take the job over); leaving the block gives it back. `cap`
    overrides PSA_MAX_INFLIGHT_PER_CONNECTION for this connection (inflight_cap); `hourly`
    is its PSA's (budget, slowdown from) calls per rolling hour (hourly_limits)."""
    previous = (getattr(_local, "connection", None), getattr(_local, "cost", 0), getattr(_local, "token", None),
                getattr(_local, "hold", 0.0), getattr(_local, "admitted", False), getattr(_local, "cap", None),
                getattr(_local, "hourly", (0, 0)))
    (_local.connection, _local.cost, _local.token, _local.hold, _local.admitted, _local.cap,
     _local.hourly) = (connection, calls, token, hold, False, cap, hourly)
    try:
        yield
    finally:
        if _local.admitted and connection is not None and token:
            release(connection, token)
        (_local.connection, _local.cost, _local.token, _local.hold, _local.admitted,
         _local.cap, _local.hourly) = previous


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
    connection, cost = getattr(_local, "connection", None), getattr(_local, "cost", 0)
    if connection is None or cost <= 0:
        return
    token = getattr(_local, "token", None)
    cap = getattr(_local, "cap", None)
    cap = max_inflight() if cap is None else cap
    hourly = getattr(_local, "hourly", (0, 0))
    kind, wait, announce, used = _admit(connection, cost, token, getattr(_local, "hold", 0.0), cap, hourly)
    if kind in ("hourly", "slowdown"):
        _hourly_refusal(provider, operation, connection, kind, wait, announce, used, hourly)
    if kind == "cooldown":
        raise CoolingDown(f"{provider} connection {connection} is cooling down after a 429",
                          retry_after=wait, operation=operation)
    if kind == "full":
        raise InflightCapReached(f"{provider} connection {connection} has {cap} jobs in flight "
                                 "(PSA_MAX_INFLIGHT_PER_CONNECTION, or the PSA's own limit)",
                                 retry_after=inflight_retry_delay(),
                                 operation=operation)
    if wait > max_wait():
        raise Throttled(f"{provider} connection {connection} is over its rate limit "
                        f"({rate_per_second():g}/s)", retry_after=wait, operation=operation)
    _local.cost = 0  # admitted: the job's other calls pass
    _local.admitted = token is not None and cap > 0  # holds a slot to give back
    if wait > 0:
        time.sleep(wait)
