"""Which hosts the worker talks to (issue 11 §2): https to public addresses only, unless the
operator allows a host in PSA_ALLOWED_HOSTS; checked when a connection is added and again,
on the resolved address, whenever the worker opens a connection (DNS rebinding)."""
from __future__ import annotations

import socket
import time

import pytest
from sqlalchemy import func, select

from models import PsaConnection
from models.db import session_scope
from tasks import admin
from tasks.errors import RequestError
from tests.security.conftest import psa_call, raises_kind
from tests.security.hostile import json_reply

PUBLIC_IP = "93.184.215.14"  # a public address: literal, so no DNS is needed to check it


def _add(base_url: str):
    with session_scope() as db:
        return admin.add_connection(db, account_id=1, provider="connectwise", base_url=base_url,
                                    company_id="acme", client_id="fake-client", public_key="fake-pub",
                                    private_key="fake-priv").base_url


def _connections() -> int:
    with session_scope() as db:
        return db.scalar(select(func.count()).select_from(PsaConnection))


@pytest.fixture()
def no_allowlist(monkeypatch):
    monkeypatch.delenv("PSA_ALLOWED_HOSTS", raising=False)


@pytest.mark.parametrize("url,reason", [
    ("http://169.254.169.254/latest/meta-data", "cloud metadata"),
    ("https://169.254.169.254/latest/meta-data", "cloud metadata"),
    ("https://[fd00:ec2::254]/", "cloud metadata"),
    ("https://metadata.google.internal/computeMetadata/v1", "cloud metadata"),
    ("http://127.0.0.1:6379", "https"),
    ("https://127.0.0.1:6379", "loopback"),
    ("https://[::1]:5432", "loopback"),
    ("https://[::ffff:127.0.0.1]:5432", "loopback"),
    ("https://localhost:5432", "loopback"),
    ("https://2130706433/", "loopback"),  # 127.0.0.1 as one decimal number
    ("https://10.0.0.5/apis/3.0", "private"),
    ("https://192.168.1.10", "private"),
    ("https://[fd12:3456::1]", "private"),
    ("https://100.64.0.1", "CGNAT"),
    ("https://[fe80::1]", "link-local"),
    ("https://169.254.10.10", "link-local"),
    ("https://224.0.0.251", "multicast"),
    ("https://0.0.0.0", "unspecified"),
    (f"http://{PUBLIC_IP}/v4_6_release/apis/3.0", "https"),
    (f"https://user:secret@{PUBLIC_IP}/", "user name or password"),
    ("ftp://psa.example.com/", "https"),
])
def test_add_connection_refuses_urls_the_worker_must_not_call(db_clean, no_allowlist, url, reason):
    with pytest.raises(RequestError) as info:
        _add(url)
    assert info.value.field == "base_url" and reason in info.value.message
    assert "secret" not in info.value.message
    assert _connections() == 0  # nothing written


def test_add_connection_accepts_a_public_https_url_and_normalises_it(db_clean, no_allowlist):
    assert _add(f"HTTPS://{PUBLIC_IP}/v4_6_release/apis/3.0/") == f"https://{PUBLIC_IP}/v4_6_release/apis/3.0"


def test_add_connection_refuses_a_name_that_does_not_resolve(db_clean, no_allowlist):
    with pytest.raises(RequestError, match="does not resolve"):
        _add("https://psa.invalid/apis/3.0")


def test_an_operator_allows_an_on_prem_host_by_name_address_or_network(db_clean, monkeypatch):
    monkeypatch.setenv("PSA_ALLOWED_HOSTS", "psa.corp.invalid, 10.20.0.0/16")
    assert _add("http://psa.corp.invalid:8080/apis/3.0")  # named: http allowed, not looked up here
    assert _add("https://10.20.1.2/apis/3.0")
    with pytest.raises(RequestError, match="private"):
        _add("https://10.21.0.1/apis/3.0")  # outside the allowed network
    with pytest.raises(RequestError, match="https"):
        _add("http://10.30.0.1/apis/3.0")


def test_metadata_stays_refused_even_inside_an_allowed_network(db_clean, monkeypatch):
    monkeypatch.setenv("PSA_ALLOWED_HOSTS", "169.254.0.0/16,fd00::/8")
    for url in ("https://169.254.169.254/", "https://[fd00:ec2::254]/"):
        with pytest.raises(RequestError, match="cloud metadata"):
            _add(url)
    with pytest.raises(RequestError, match="cloud metadata"):
        _add("https://[::ffff:169.254.169.254]/")


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]"])
def test_connect_time_refuses_loopback_without_the_allowlist_and_sends_nothing(hostile, no_allowlist, host):
    server = hostile(json_reply(200, {"id": 1}), host=host.strip("[]"))
    for scheme in ("http", "https"):
        with raises_kind("unsafe_destination") as info:
            psa_call(f"{scheme}://{host}:{server.port}/service/tickets/1")
        assert not info.value.retryable
    assert server.seen == []  # refused before connecting: no credentials, no request


@pytest.mark.parametrize("url,reason", [
    ("https://169.254.169.254/latest/meta-data", "cloud metadata"),
    ("https://metadata.google.internal/computeMetadata/v1", "cloud metadata"),
    ("https://10.0.0.5/apis/3.0/service/tickets/1", "private"),
    (f"http://{PUBLIC_IP}/apis/3.0/service/tickets/1", "https"),
])
def test_connect_time_refuses_a_repointed_connection_at_once(no_allowlist, url, reason):
    started = time.monotonic()
    with raises_kind("unsafe_destination") as info:
        psa_call(url)
    assert reason in str(info.value) and time.monotonic() - started < 1  # no connect attempted


class _Resolver:
    """socket.getaddrinfo with some names answered from a table that a test changes."""

    def __init__(self, monkeypatch):
        self.table: dict[str, list[str]] = {}
        self.real = socket.getaddrinfo
        monkeypatch.setattr(socket, "getaddrinfo", self)

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        if isinstance(host, str) and host in self.table:
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                     (a, port) if ":" not in a else (a, port, 0, 0)) for a in self.table[host]]
        return self.real(host, port, family, type, proto, flags)


def test_dns_rebinding_is_refused_when_the_connection_opens(db_clean, hostile, monkeypatch):
    # Added while the name resolved to a public address; later it answers 127.0.0.1.
    monkeypatch.setenv("PSA_ALLOWED_HOSTS", "")
    resolver = _Resolver(monkeypatch)
    server = hostile(json_reply(200, {"id": 1, "status": {"id": 1, "name": "New"}}))
    resolver.table["psa.rebind.invalid"] = [PUBLIC_IP]
    base = _add(f"https://psa.rebind.invalid:{server.port}/apis/3.0")
    resolver.table["psa.rebind.invalid"] = ["127.0.0.1"]
    with raises_kind("unsafe_destination") as info:
        psa_call(base + "/service/tickets/1")
    assert "resolves to a loopback address" in str(info.value)
    assert "127.0.0.1" not in str(info.value)  # the category, not our resolver's answer
    # One bad address in the answer is enough: a mixed answer is refused whole.
    resolver.table["psa.rebind.invalid"] = [PUBLIC_IP, "127.0.0.1"]
    with raises_kind("unsafe_destination"):
        psa_call(base + "/service/tickets/1")
    assert server.seen == []
    # Control: the same name, allowed by the operator, does reach the server (over http,
    # which the name's listing allows too), so the refusals above were the address check.
    monkeypatch.setenv("PSA_ALLOWED_HOSTS", "psa.rebind.invalid")
    resolver.table["psa.rebind.invalid"] = ["127.0.0.1"]
    assert psa_call(f"http://psa.rebind.invalid:{server.port}/apis/3.0/service/tickets/1")["id"] == 1
    assert len(server.seen) == 1


def test_an_allowed_address_does_not_allow_a_metadata_name(monkeypatch):
    monkeypatch.setenv("PSA_ALLOWED_HOSTS", "169.254.0.0/16")
    with raises_kind("unsafe_destination") as info:
        psa_call("https://metadata.google.internal/computeMetadata/v1/")
    assert "cloud metadata" in str(info.value)
