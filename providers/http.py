"""Shared HTTP plumbing for providers: pooled keep-alive sessions, timeouts, error mapping,
and call observers (metrics and logs hook in here without providers knowing about them)."""
from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from providers.errors import PsaProtocolError, PsaTransientError, from_response

CallHook = Callable[..., None]
_observers: list[CallHook] = []
_gates: list[CallHook] = []
_sessions: dict[str, requests.Session] = {}
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


def timeouts() -> tuple[float, float]:
    return (float(os.environ.get("PSA_CONNECT_TIMEOUT", "5")), float(os.environ.get("PSA_READ_TIMEOUT", "30")))


def pooled_session(key_material: str, base_url: str) -> requests.Session:
    """One keep-alive session per PSA connection, shared by the worker's threads.

    requests.Session is safe to share for plain calls without cookies; the adapter's pool
    is sized to the worker concurrency so threads do not open throwaway connections.

    The environment is read once, here, not on every request (`trust_env`): requests would
    otherwise re-scan os.environ for proxies and stat ~/.netrc per call (a tenth of a
    worker's CPU per job), and a ~/.netrc entry for the PSA's host would silently replace
    our Authorization header. HTTP(S)_PROXY / NO_PROXY and REQUESTS_CA_BUNDLE still apply.
    """
    key = hashlib.sha256(key_material.encode()).hexdigest()
    with _sessions_lock:
        session = _sessions.get(key)
        if session is None:
            size = int(os.environ.get("PSA_HTTP_POOL_SIZE", os.environ.get("WORKER_CONCURRENCY", "32")))
            session = requests.Session()
            session.trust_env = False
            session.proxies = requests.utils.get_environ_proxies(base_url)
            session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=size, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            _sessions[key] = session
        return session


def call(session: requests.Session, method: str, url: str, *, provider: str, operation: str,
         headers: dict[str, str], json: Any = None, params: dict[str, Any] | None = None,
         data: Any = None) -> Any:
    """Send one request; return parsed JSON or raise a typed PsaError. Never retries itself:
    retry decisions belong to the job, which knows whether a POST may be repeated.
    `data` is a form-encoded body (OAuth token requests)."""
    for gate in _gates:
        gate(provider, operation)
    started = time.monotonic()
    status: int | None = None
    error: str | None = None
    try:
        try:
            resp = session.request(method, url, headers=headers, json=json, params=params, data=data,
                                   timeout=timeouts())
        except requests.Timeout as err:
            raise PsaTransientError(f"timed out talking to {provider}", operation=operation) from err
        except requests.ConnectionError as err:
            raise PsaTransientError(f"connection to {provider} failed or was reset", operation=operation) from err
        status = resp.status_code
        body = _parse(resp)
        if status >= 400:
            raise from_response(status, body, resp.headers, operation=operation, provider=provider)
        if status != 204 and body is None:
            raise PsaProtocolError("reply was not JSON", status_code=status, operation=operation)
        return body
    except Exception as err:
        error = type(err).__name__
        raise
    finally:
        seconds = time.monotonic() - started
        for hook in list(_observers):
            try:
                hook(provider=provider, operation=operation, status=status, seconds=seconds, error=error)
            except Exception:  # an observer must never break a writeback
                pass


def _parse(resp: requests.Response) -> Any:
    if not resp.content:
        return None
    try:
        return resp.json()
    except ValueError:
        return resp.text
