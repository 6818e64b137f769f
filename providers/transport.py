"""The connection layer under providers.http: address checks when a connection opens, and
a wall-clock deadline per call that no server can stretch.

Address checks. urllib3 resolves the host and connects inside `_new_conn`; our connection
classes do the same look-up themselves, check every address (providers.netguard) and
connect to a checked one. The name stays the connection's host, so SNI, the Host header
and certificate verification are unchanged. A keep-alive connection is checked once, when
it opens: no look-up per call beyond what a connection already does.

Proxies. The operator's proxy is trusted and connected to as configured. Through a CONNECT
tunnel (https) the proxy resolves the target, so we resolve and check the target name when
the tunnel opens; a rebinding between our look-up and the proxy's is then the proxy's
egress policy to stop. Plain http through a forwarding proxy needs the host in
PSA_ALLOWED_HOSTS (providers.netguard.check_proxied_url). SOCKS proxies are refused.

Deadline. Socket timeouts are per read: a server sending one byte every half second never
trips a 30 s read timeout, in the headers or the body. Each call registers a Budget; the
connection it uses records itself on the budget, and one watchdog thread per process shuts
the socket down when the budget runs out, which wakes the blocked read at once. The read
loop in providers.http checks the same deadline between chunks.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import allowed_gai_family
from urllib3.util.timeout import _DEFAULT_TIMEOUT

from providers import netguard
from providers.errors import PsaUnsafeDestination

WATCHDOG_TICK = 0.05  # how late past its deadline a blocked call may be cut


class Budget:
    """One call's deadline, and the socket it is using (set by the connection). The socket
    itself, not the connection: http.client drops a connection's socket as soon as the
    headers say the reply ends at close, and the body is then read from that socket."""
    __slots__ = ("deadline", "seconds", "sock", "expired", "done")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.sock: Any = None
        self.expired = False
        self.done = False

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


_local = threading.local()
_active: set[Budget] = set()
_kill_lock = threading.Lock()
_watchdog_pid: int | None = None
_start_lock = threading.Lock()


def start_budget(seconds: float) -> Budget:
    budget = Budget(seconds)
    _local.budget = budget
    _active.add(budget)
    if _watchdog_pid != os.getpid():  # first call in this process (or in a forked child)
        _start_watchdog()
    return budget


def end_budget(budget: Budget) -> None:
    with _kill_lock:  # after this the watchdog can no longer touch the connection, which
        budget.done = True  # may go back to the pool and serve another call
    _active.discard(budget)
    _local.budget = None


def _current() -> Budget | None:
    return getattr(_local, "budget", None)


def _start_watchdog() -> None:
    global _watchdog_pid
    with _start_lock:
        if _watchdog_pid == os.getpid():
            return
        threading.Thread(target=_watch, name="psa-call-deadline", daemon=True).start()
        _watchdog_pid = os.getpid()


def _watch() -> None:
    while True:
        time.sleep(WATCHDOG_TICK)
        now = time.monotonic()
        for budget in tuple(_active):
            if now >= budget.deadline and not budget.expired:
                _expire(budget)


def _expire(budget: Budget) -> None:
    with _kill_lock:
        if budget.done:
            return
        budget.expired = True
        sock = budget.sock
        sock = sock if isinstance(sock, socket.socket) else getattr(sock, "socket", None)  # TLS-in-TLS
        if isinstance(sock, socket.socket):
            try:
                # The base class's shutdown even for an SSLSocket: it acts on the file
                # descriptor and wakes the blocked read without touching the TLS state.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass


class _Checked:
    """Mixin for urllib3's connection classes (see the module docstring)."""
    _tls = False

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        if (budget := _current()) is not None:
            budget.sock = self.sock  # type: ignore[attr-defined]  # the TLS socket, once wrapped

    def request(self, *args: Any, **kwargs: Any) -> None:
        if (budget := _current()) is not None and self.sock is not None:  # type: ignore[attr-defined]
            budget.sock = self.sock  # type: ignore[attr-defined]  # a kept-alive connection
        super().request(*args, **kwargs)  # type: ignore[misc]

    def _new_conn(self) -> socket.socket:
        conn: Any = self
        if conn.proxy is not None:
            if conn._tunnel_host:
                netguard.resolve_checked(conn._tunnel_host, conn._tunnel_port or 443, tls=True)
            return super()._new_conn()  # type: ignore[misc]
        try:
            infos = netguard.resolve_checked(conn._dns_host, conn.port, tls=self._tls, family=allowed_gai_family())
            sock = _connect_any(infos, conn.timeout, conn.source_address, conn.socket_options)
        except socket.gaierror as err:
            raise NameResolutionError(conn.host, conn, err) from err
        except TimeoutError as err:
            raise ConnectTimeoutError(conn, f"Connection to {conn.host} timed out. (connect timeout={conn.timeout})") \
                from err
        except OSError as err:
            raise NewConnectionError(conn, f"Failed to establish a new connection: {err}") from err
        sys.audit("http.client.connect", self, conn.host, conn.port)
        return sock


def _connect_any(infos: list[tuple], timeout: Any, source_address: Any, options: Any) -> socket.socket:
    """urllib3's create_connection over addresses already resolved and checked; each attempt
    also bounded by what is left of the call's deadline."""
    budget = _current()
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = None
        try:
            sock = socket.socket(family, kind, proto)
            for option in options or ():
                sock.setsockopt(*option)
            limit = None if timeout is _DEFAULT_TIMEOUT else timeout
            if budget is not None:
                left = budget.remaining()
                if left <= 0:
                    raise TimeoutError("call deadline reached while connecting")
                limit = left if limit is None else min(limit, left)
            if limit is not None or timeout is not _DEFAULT_TIMEOUT:
                sock.settimeout(limit)
            if source_address:
                sock.bind(source_address)
            if budget is not None:
                budget.sock = sock  # the TLS handshake reads from it before connect() returns
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            error = err
            if sock is not None:
                sock.close()
    raise error or OSError("getaddrinfo returned no address")


class CheckedHTTPConnection(_Checked, HTTPConnection):
    _tls = False


class CheckedHTTPSConnection(_Checked, HTTPSConnection):
    _tls = True


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = CheckedHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = CheckedHTTPSConnection


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class CheckedAdapter(HTTPAdapter):
    """requests' adapter with our pools, direct or through an HTTP(S) proxy."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_POOLS)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        if proxy.lower().startswith("socks"):
            raise PsaUnsafeDestination("SOCKS proxies are not supported for PSA calls: the worker could not check "
                                       "the PSA's address through one; use an HTTP(S) proxy")
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = dict(_POOLS)
        return manager
