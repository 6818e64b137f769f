"""Hostile servers and direct PSA calls for the security suite."""
from __future__ import annotations

import contextlib
import uuid
from typing import Any

import pytest

from providers.http import call, pooled_session
from tests.security.hostile import HostileServer, Reply


@pytest.fixture()
def hostile():
    """hostile(reply) starts a HostileServer on loopback; all are stopped after the test."""
    servers: list[HostileServer] = []

    def start(reply: Reply, host: str = "127.0.0.1") -> HostileServer:
        server = HostileServer(reply, host).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def psa_call(url: str, method: str = "GET", *, operation: str = "get_ticket", **kwargs: Any) -> Any:
    """One call through providers.http as a provider makes it, on a fresh pooled session."""
    session = pooled_session(f"security-test|{uuid.uuid4()}", url)
    headers = kwargs.pop("headers", {"clientId": "fake-client-id-0000", "Authorization": "Basic ZmFrZTpmYWtl"})
    return call(session, method, url, provider="connectwise", operation=operation, headers=headers, **kwargs)


@contextlib.contextmanager
def raises_kind(kind: str):
    """Like pytest.raises, on the error's `kind` (works on any PsaError subclass)."""
    from providers.errors import PsaError

    with pytest.raises(PsaError) as info:
        yield info
    assert info.value.kind == kind, f"expected a {kind} error, got {type(info.value).__name__}: {info.value}"
