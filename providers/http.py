"""Shared HTTP plumbing for providers: pooled keep-alive sessions, timeouts, error mapping,
and call observers (metrics and logs hook in here without providers knowing about them).

Every provider goes through `call()`, so every PSA call gets the same limits: the address
checks of providers.transport, no redirects, a cap on the reply's decoded size, and a
wall-clock deadline (a tenant's PSA is untrusted: see README "Security model").
"""
from __future__ import annotations

import hashlib
import json as jsonlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import requests
import urllib3
from requests.structures import CaseInsensitiveDict

from models import settings
from providers import netguard, transport
from providers.errors import (PsaDeadlineExceeded, PsaError, PsaProtocolError, PsaRedirectRefused, PsaUnreachable,
                              PsaResponseTooLarge, PsaTransientError, from_response)

CallHook = Callable[..., None]
_observers: list[CallHook] = []
_gates: list[CallHook] = []
# key -> (session, monotonic time of its last use), least recently used first.
_sessions: OrderedDict[str, tuple[requests.Session, float]] = OrderedDict()
_sessions_lock = threading.Lock()


def add_observer(hook: CallHook) -> None:
    """hook(provider=, operation=, status=, seconds=, error=) after every PSA call."""
    if hook not in _observers:
        _observers.append(hook)


def add_gate(gate: CallHook) -> None:
    """gate(provider, operation) before every PSA call; it may sleep, or raise a PsaError
    to refuse the call (a rate limiter: tasks.ratelimit)."""
    if gate not in _gates:
        _gates.append(gate)


DEFAULT_MAX_RESPONSE_BYTES = 4 * 1024 * 1024
READ_CHUNK = 64 * 1024  # decoded bytes per read: urllib3 (>= 2.6) never inflates more per step
_NOT_JSON = object()


def timeouts() -> tuple[float, float]:
    return (settings.number("PSA_CONNECT_TIMEOUT", 5, positive=True),
            settings.number("PSA_READ_TIMEOUT", 30, positive=True))


def call_deadline(limits: tuple[float, float] | None = None) -> float:
    """Wall-clock seconds one call may take, connect and every read included (`limits`: the
    timeouts() already read, if any). tasks.store sizes the job lease from it, so a call
    always ends inside its lease."""
    deadline = settings.number("PSA_CALL_DEADLINE_SECONDS", 0, minimum=0)
    return deadline if deadline > 0 else sum(limits or timeouts())


def max_response_bytes() -> int:
    return settings.integer("PSA_MAX_RESPONSE_BYTES", DEFAULT_MAX_RESPONSE_BYTES, positive=True)


def max_sessions() -> int:
    """Connections whose keep-alive session a worker process keeps at once. 128 is four
    times the connections a 32-thread worker can be calling at any moment, and keeps a
    worker's sockets (mostly one idle keep-alive socket per kept session) under 256."""
    return max(settings.integer("PSA_HTTP_MAX_SESSIONS", 128), 1)


def idle_seconds() -> float:
    """A session unused this long is closed (its sockets with it)."""
    return settings.number("PSA_HTTP_IDLE_SECONDS", 300, minimum=0)


def pool_size() -> int:
    """Keep-alive sockets one connection's session keeps. One connection never has more
    calls in flight than its in-flight cap (tasks.ratelimit, a job's calls are sequential),
    so a pool sized to the worker concurrency would only hold sockets nobody can use."""
    size = settings.integer("PSA_HTTP_POOL_SIZE", 0)
    if size:
        return max(size, 1)
    cap = settings.integer("PSA_MAX_INFLIGHT_PER_CONNECTION", 8)
    concurrency = settings.integer("WORKER_CONCURRENCY", 32, positive=True)
    return max(min(cap, concurrency) if cap > 0 else concurrency, 1)


def pooled_session(key_material: str, base_url: str) -> requests.Session:
    """One keep-alive session per PSA connection, shared by the worker's threads.

    requests.Session is safe to share for plain calls without cookies; the adapter's pool
    is sized to what one connection can use (pool_size) so threads do not open throwaway
    connections.

    Bounded for workers serving thousands of tenants: at most PSA_HTTP_MAX_SESSIONS
    sessions, least recently used first out, and a session idle for PSA_HTTP_IDLE_SECONDS
    is closed on the next look-up. A busy tenant's session is used again and again, so it
    stays, with its keep-alive sockets. Closing a session closes its idle sockets; a call
    still running on it finishes, and its socket is closed rather than pooled.

    The environment is read once, here, not on every request (`trust_env`): requests would
    otherwise re-scan os.environ for proxies and stat ~/.netrc per call (a tenth of a
    worker's CPU per job), and a ~/.netrc entry for the PSA's host would silently replace
    our Authorization header. HTTP(S)_PROXY / NO_PROXY and REQUESTS_CA_BUNDLE still apply.
    """
    key = hashlib.sha256(key_material.encode()).hexdigest()
    now = time.monotonic()
    evicted: list[requests.Session] = []
    with _sessions_lock:
        entry = _sessions.pop(key, None)
        session = entry[0] if entry is not None else None
        if entry is not None and now - entry[1] > idle_seconds():
            evicted.append(entry[0])
            session = None
        if session is None:
            session = _new_session(base_url)
        _sessions[key] = (session, now)  # most recently used: last
        evicted.extend(_evict(now))
    for old in evicted:  # outside the lock: closing sockets may take a moment
        old.close()
    return session


def _evict(now: float) -> list[requests.Session]:
    """Take out the sessions over the cap and the idle ones (the oldest are first, so the
    scan stops at the first fresh one). Called with _sessions_lock held."""
    limit, idle = max_sessions(), idle_seconds()
    out: list[requests.Session] = []
    while _sessions:
        key, (session, used) = next(iter(_sessions.items()))
        if len(_sessions) <= limit and now - used <= idle:
            break
        del _sessions[key]
        out.append(session)
    return out


def _new_session(base_url: str) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.proxies = requests.utils.get_environ_proxies(base_url)
    session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    # pool_connections: host pools per session; a connection talks to one host (two with a
    # proxy), so a few suffice.
    adapter = transport.CheckedAdapter(pool_connections=2, pool_maxsize=pool_size(), max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def session_count() -> int:
    return len(_sessions)


def close_sessions() -> None:
    """Close every pooled session (tests, worker shutdown)."""
    with _sessions_lock:
        sessions = [s for s, _ in _sessions.values()]
        _sessions.clear()
    for session in sessions:
        session.close()


def call(session: requests.Session, method: str, url: str, *, provider: str, operation: str,
         headers: dict[str, str], json: Any = None, params: dict[str, Any] | None = None,
         data: Any = None) -> Any:
    """Send one request; return parsed JSON or raise a typed PsaError. Never retries itself:
    retry decisions belong to the job, which knows whether a POST may be repeated.
    `data` is for form-encoded bodies (OAuth token requests)."""
    for gate in _gates:
        gate(provider, operation)
    started = time.monotonic()
    status: int | None = None
    error: str | None = None
    limits = timeouts()  # read once per call: the socket timeouts and the deadline both come from them
    budget = transport.start_budget(call_deadline(limits))
    try:
        try:
            if session.proxies:
                netguard.check_proxied_url(url)
            status, reply_headers, body = _exchange(session, method, url, budget, provider, limits, headers=headers,
                                                    json=json, params=params, data=data)
        except PsaError as err:
            err.operation = err.operation or operation
            raise
        except Exception as err:
            if budget.expired:  # the watchdog cut the socket: whatever broke, the deadline did it
                raise _deadline_error(budget, provider, operation) from err
            if isinstance(err, requests.RequestException):
                raise _transport_error(err, provider, operation) from err
            raise
        if 300 <= status < 400:
            # Never followed: a redirect would re-send the note and the credentials to a
            # host nobody checked. The Location value is the server's and is not shown.
            raise PsaRedirectRefused(f"{provider} answered with a redirect (HTTP {status}); redirects are never "
                                     f"followed: check the connection's base URL", status_code=status,
                                     operation=operation)
        if status >= 400:
            raise from_response(status, None if body is _NOT_JSON else body, reply_headers, operation=operation,
                                provider=provider)
        if status != 204 and (body is None or body is _NOT_JSON):
            raise PsaProtocolError("reply was not JSON", status_code=status, operation=operation)
        return body
    except Exception as err:
        error = type(err).__name__
        raise
    finally:
        transport.end_budget(budget)
        seconds = time.monotonic() - started
        for hook in list(_observers):
            try:
                hook(provider=provider, operation=operation, status=status, seconds=seconds, error=error)
            except Exception:  # an observer must never break a writeback
                pass


def _exchange(session: requests.Session, method: str, url: str, budget: transport.Budget, provider: str,
              limits: tuple[float, float], **kwargs: Any) -> tuple[int, Any, Any]:
    """(status, headers, parsed body) of one request, the body read under the size cap and
    the deadline. The connection is closed, not pooled, when a read is cut short."""
    resp = _send(session, method, url, timeout=limits, **kwargs)
    try:
        if 300 <= resp.status_code < 400:
            return resp.status_code, resp.headers, None  # refused unread
        return resp.status_code, resp.headers, _parse(_read_capped(resp, budget, provider))
    finally:
        resp.close()


def _send(session: requests.Session, method: str, url: str, *, headers: dict[str, str], json: Any = None,
          params: dict[str, Any] | None = None, data: Any = None,
          timeout: tuple[float, float] | None = None) -> requests.Response:
    """One request through the session's adapter (its pools, address checks and proxies),
    streamed and never redirected.

    Not `session.request()`: that merges the session's cookies, hooks, auth and settings on
    every call and runs the redirect and cookie machinery after it, about a tenth of a
    worker's CPU per job at zero PSA latency, for nothing we use. A PSA's Set-Cookie is
    therefore never stored or sent back: a tenant's server cannot plant state in our calls."""
    merged = CaseInsensitiveDict(session.headers)  # requests' defaults (User-Agent, Accept-Encoding)
    merged.update(headers)
    prepared = requests.PreparedRequest()
    prepared.prepare(method=method, url=url, headers=merged, data=data, params=params, json=json)
    return session.get_adapter(prepared.url).send(prepared, stream=True, timeout=timeout or timeouts(),
                                                  verify=session.verify, cert=None, proxies=session.proxies)


def _read_capped(resp: requests.Response, budget: transport.Budget, provider: str) -> bytes:
    """The decoded body, at most PSA_MAX_RESPONSE_BYTES of it. Counting decoded bytes is
    what stops a gzip bomb: 150 KB on the wire can inflate to hundreds of MB."""
    cap = max_response_bytes()
    declared = (resp.headers.get("Content-Length") or "").strip()
    if declared.isdigit() and int(declared) > cap:
        raise PsaResponseTooLarge(f"reply declares {int(declared)} bytes (Content-Length), over the limit of {cap} "
                                  f"bytes (PSA_MAX_RESPONSE_BYTES); not read", status_code=resp.status_code)
    chunks: list[bytes] = []
    total = 0
    for chunk in resp.iter_content(READ_CHUNK):
        total += len(chunk)
        if total > cap:
            raise PsaResponseTooLarge(f"reply passed the limit of {cap} bytes once decoded (PSA_MAX_RESPONSE_BYTES); "
                                      f"reading stopped", status_code=resp.status_code)
        if time.monotonic() > budget.deadline:
            raise _deadline_error(budget, provider, None)
        chunks.append(chunk)
    if budget.expired:  # the watchdog cut a reply without a length: what we have is not all of it
        raise _deadline_error(budget, provider, None)
    return b"".join(chunks)


def _parse(data: bytes) -> Any:
    if not data:
        return None
    try:
        return jsonlib.loads(data)
    except ValueError:  # also UnicodeDecodeError: the body is not copied anywhere (errors.py)
        return _NOT_JSON


def _deadline_error(budget: transport.Budget, provider: str, operation: str | None) -> PsaDeadlineExceeded:
    return PsaDeadlineExceeded(f"no complete reply from {provider} within {budget.seconds:g} s "
                               f"(PSA_CALL_DEADLINE_SECONDS)", operation=operation)


def _transport_error(err: requests.RequestException, provider: str, operation: str) -> PsaError:
    if isinstance(err, requests.exceptions.ConnectTimeout):
        return PsaUnreachable(f"timed out talking to {provider}", operation=operation)
    if isinstance(err, requests.Timeout):
        return PsaTransientError(f"timed out talking to {provider}", operation=operation)
    if isinstance(err, requests.exceptions.ContentDecodingError):
        return PsaProtocolError(f"reply from {provider} could not be decoded (bad compression)", operation=operation)
    reason = getattr(err.args[0], "reason", None) if err.args else None
    if isinstance(err, requests.ConnectionError) and isinstance(reason, urllib3.exceptions.NewConnectionError):
        # refused or unresolvable (NameResolutionError is a NewConnectionError): never connected
        return PsaUnreachable(f"connection to {provider} failed or was reset", operation=operation)
    return PsaTransientError(f"connection to {provider} failed or was reset", operation=operation)
