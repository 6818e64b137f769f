"""The address rules of providers.netguard, and what happens through a proxy."""
from __future__ import annotations

import ipaddress

import pytest

from models.crypto import ConfigurationError
from providers import netguard
from tests.security.conftest import psa_call, raises_kind
from tests.security.hostile import json_reply


@pytest.mark.parametrize("address,problem", [
    ("127.0.0.2", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("64:ff9b::7f00:1", "loopback"),  # NAT64 form of 127.0.0.1
    ("2002:7f00:1::", "loopback"),  # 6to4 form of 127.0.0.1
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.0.1", "private"), ("fc00::1", "private"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"), ("::ffff:169.254.1.1", "link-local"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("239.1.1.1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("100.64.0.1", "shared (CGNAT 100.64.0.0/10)"), ("240.0.0.1", "private"), ("2001:db8::1", "private"),
    ("169.254.169.254", "cloud metadata"), ("fd00:ec2::254", "cloud metadata"), ("168.63.129.16", "cloud metadata"),
    ("198.18.0.1", "private"),  # benchmarking range: not routable
    ("8.8.8.8", None), ("2606:4700:4700::1111", None), ("::ffff:8.8.8.8", None), ("64:ff9b::808:808", None),
])
def test_address_categories(address, problem):
    assert netguard.address_problem(ipaddress.ip_address(address)) == problem


def test_allowlist_parses_names_addresses_and_networks_and_refuses_junk():
    allow = netguard._parse("PSA.Corp.Example., 10.0.0.0/8, ::1, [fd12::1], 192.168.5.7")
    assert allow.allows_name("psa.corp.example") and allow.allows_name("10.9.9.9") and allow.allows_name("[::1]")
    assert allow.allows_address(ipaddress.ip_address("192.168.5.7"))
    assert not allow.allows_address(ipaddress.ip_address("192.168.5.8"))
    assert not allow.allows_name("other.example")
    with pytest.raises(ConfigurationError, match="PSA_ALLOWED_HOSTS"):
        netguard._parse("10.0.0.0/33")
    with pytest.raises(ConfigurationError, match="PSA_ALLOWED_HOSTS"):
        netguard._parse("psa.example:8443")


def test_an_https_proxy_tunnel_is_checked_for_its_target_before_connect(hostile, monkeypatch):
    monkeypatch.delenv("PSA_ALLOWED_HOSTS", raising=False)
    proxy = hostile(json_reply(200, {}))
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")  # the operator's proxy: trusted
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with raises_kind("unsafe_destination") as info:
        psa_call("https://10.0.0.5/apis/3.0/service/tickets/1")  # via CONNECT: the target is checked
    assert "private" in str(info.value)
    with raises_kind("unsafe_destination") as info:
        psa_call("http://93.184.215.14/apis/3.0/service/tickets/1")  # forwarded: needs the allowlist
    assert "https" in str(info.value)
    assert proxy.seen == []  # the proxy was never asked to go there


def test_a_socks_proxy_is_refused_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "socks5h://127.0.0.1:1080")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with raises_kind("unsafe_destination") as info:
        psa_call("https://93.184.215.14/apis/3.0/service/tickets/1")
    assert "SOCKS" in str(info.value)
