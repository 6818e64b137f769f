"""Per-PSA-connection rate limiting, shared by every worker through Redis.

Two rules, both keyed by the connection (a tenant's PSA), never global:
- Cooldown: a 429 from the PSA sets `psa-writeback:cooldown:<connection id>:<url hash>` for its
  Retry-After (RATE_LIMIT_DEFAULT_COOLDOWN_SECONDS when it gives none). Until it expires no
  worker calls that PSA: a job that would is deferred to the end of the cooldown without
  an HTTP call and without spending an attempt (runner), so a 429 storm slows that tenant
  alone and never turns into a retry storm.
- Token bucket: at most PSA_RATE_LIMIT_PER_SECOND calls per second per connection
  (burst PSA_RATE_LIMIT_BURST). A job takes the tokens of all its calls at its first call
  (one Lua call per job, not per call: a Redis round trip per HTTP call was a tenth of a
  worker's time); its later calls pass, and a 429 among them still starts the cooldown. A
  short wait for tokens is slept; a longer one defers the job like a cooldown does. 0 turns
  the bucket off.

Redis is RATE_LIMIT_REDIS_URL, else the broker when it is Redis; without Redis (the demo)
both rules are off. If Redis fails, calls go ahead (fail open): the PSA's own 429s and the
retry policy still protect it, and a writeback is never stuck on its rate limiter.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
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

# KEYS[1] cooldown, KEYS[2] bucket; ARGV rate/s, burst, now (s), longest wait (s), tokens. One round trip per call:
# returns -ms while cooling down, else the ms to wait for a token (0: taken; rate 0: off).
_GATE = """
local cool = redis.call('PTTL', KEYS[1])
if cool > 0 then return -cool end
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if rate <= 0 then return 0 end
local state = redis.call('HMGET', KEYS[2], 'tokens', 'at')
local tokens, at = tonumber(state[1]) or burst, tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
-- A caller that will sleep for its token takes it now (the bucket goes into debt), so the
-- next caller queues behind it; one that would wait longer than ARGV[4] takes nothing.
local cost = math.min(tonumber(ARGV[5]), burst)
local wait = 0
if tokens < cost then wait = math.ceil((cost - tokens) / rate * 1000) end
if wait <= tonumber(ARGV[4]) * 1000 then tokens = tokens - cost end
redis.call('HSET', KEYS[2], 'tokens', tokens, 'at', now)
redis.call('PEXPIRE', KEYS[2], math.ceil(burst / rate * 1000) + 1000)
return wait
"""
# KEYS[1] cooldown; ARGV ms. Never shortens a longer cooldown another worker set.
_COOLDOWN = """
local left = redis.call('PTTL', KEYS[1])
if left < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], '1', 'PX', ARGV[1]) end
return math.max(left, tonumber(ARGV[1]))
"""


class Throttled(PsaRateLimited):
    """Our own limiter said "not now" (no HTTP call was made): the job is deferred to
    `retry_after` without spending an attempt."""


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
            client._pswb_scripts = (client.register_script(_GATE), client.register_script(_COOLDOWN))
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


@_guard(0.0)
def start_cooldown(connection: str, seconds: float | None) -> float:
    """A 429 from this connection's PSA: nobody calls it for `seconds` (its Retry-After)."""
    client = _redis()
    if client is None:
        return 0.0
    ms = max(int((seconds if seconds is not None else default_cooldown()) * 1000), 1)
    left = client._pswb_scripts[1](keys=[_key("cooldown", connection)], args=[ms])
    log.warning("PSA connection %s answered 429: calls paused for %.1fs", connection, int(left) / 1000)
    return int(left) / 1000


@_guard(0.0)
def take_token(connection: str, cost: int = 1) -> float:
    """Take `cost` calls' tokens. Returns the seconds to wait first (0: go now), or minus the
    seconds of cooldown left when the connection is cooling down (no token taken)."""
    client = _redis()
    if client is None:
        return 0.0
    wait_ms = client._pswb_scripts[0](keys=[_key("cooldown", connection), _key("bucket", connection)],
                                      args=[rate_per_second(), burst(), time.time(), max_wait(), cost])
    return int(wait_ms) / 1000


@contextlib.contextmanager
def counting_against(connection: str | None, calls: int = 1) -> Iterator[None]:
    """PSA calls made by this thread inside the block count against `connection`: the first
    one passes the gate for `calls` calls (the job's expected number), the others go."""
    previous = getattr(_local, "connection", None), getattr(_local, "cost", 0)
    _local.connection, _local.cost = connection, calls
    try:
        yield
    finally:
        _local.connection, _local.cost = previous


def gate(provider: str, operation: str) -> None:
    """Called before every PSA call (providers.http): wait for the connection's cooldown
    and a token, or raise Throttled when that would take longer than max_wait()."""
    connection, cost = getattr(_local, "connection", None), getattr(_local, "cost", 0)
    if connection is None or cost <= 0:
        return
    wait = take_token(connection, cost)
    if wait < 0:
        raise Throttled(f"{provider} connection {connection} is cooling down after a 429",
                        retry_after=-wait, operation=operation)
    if wait > max_wait():
        raise Throttled(f"{provider} connection {connection} is over its rate limit "
                        f"({rate_per_second():g}/s)", retry_after=wait, operation=operation)
    _local.cost = 0  # admitted: the job's other calls pass
    if wait > 0:
        time.sleep(wait)

