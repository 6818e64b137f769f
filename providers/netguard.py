"""Which hosts and addresses the worker may talk to for a tenant's PSA.

Tenants choose their PSA URL, so a URL is hostile until proven otherwise: it may name our
own Redis, PostgreSQL, a cloud metadata service, or a name that resolves somewhere public
when the connection is added and to 127.0.0.1 a minute later (DNS rebinding). So:

- the check that counts runs when a connection is *opened*, on the addresses it is about
  to connect to (providers.transport resolves once, checks every address, and connects to
  a checked one; TLS still verifies the certificate against the name);
- `check_base_url` runs the same rules when a connection is added, for a clear message
  at the moment someone can fix it;
- only https, and only to globally routable addresses, unless the operator names the
  host, address or network in PSA_ALLOWED_HOSTS (on-prem PSAs, simulators, tests);
- cloud metadata names and addresses are refused even then: no PSA lives there, and a
  broad allowed network (169.254.0.0/16, fd00::/8) must not open them by accident.
"""
from __future__ import annotations

import functools
import ipaddress
import os
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from models.crypto import ConfigurationError
from providers.errors import PsaUnsafeDestination

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

SETTING = "PSA_ALLOWED_HOSTS"
METADATA_NAMES = frozenset({"metadata.google.internal", "metadata.goog", "metadata", "instance-data",
                            "instance-data.ec2.internal", "metadata.azure.internal"})
# AWS/GCP/Azure/OpenStack IMDS, AWS IMDS over IPv6, ECS task metadata, Alibaba, Azure wire server.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200", "168.63.129.16"))
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class UnsafeUrlError(ValueError):
    """A PSA URL the worker will not call (RequestError-compatible: .message, .field)."""

    def __init__(self, message: str, *, field: str = "base_url") -> None:
        super().__init__(message)
        self.message = message
        self.field = field


@dataclass(frozen=True)
class Allowlist:
    names: frozenset[str]
    networks: tuple[Network, ...]

    def allows_name(self, host: str) -> bool:
        name = normalise_host(host)
        if name in self.names:
            return True
        ip = _literal(name)
        return ip is not None and self.allows_address(ip)

    def allows_address(self, ip: IP) -> bool:
        return any(ip.version == net.version and ip in net for net in self.networks)


@functools.lru_cache(maxsize=8)
def _parse(raw: str) -> Allowlist:
    names: set[str] = set()
    networks: list[Network] = []
    for entry in (e.strip() for e in raw.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            continue
        except ValueError:
            pass
        if "/" in entry or ":" in entry or " " in entry:
            raise ConfigurationError(f"{SETTING}: {entry!r} is neither a host name, an IP address nor a network")
        names.add(normalise_host(entry))
    return Allowlist(frozenset(names), tuple(networks))


def allowlist() -> Allowlist:
    """Read per use (cached per value): a new connection sees the current setting."""
    return _parse(os.environ.get(SETTING, ""))


def normalise_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def _literal(host: str) -> IP | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def address_problem(ip: IP) -> str | None:
    """Why `ip` is not a public address (None: it is), checked on what an address embeds
    too: ::ffff:127.0.0.1 reaches 127.0.0.1, and so may 6to4 and NAT64 forms."""
    if ip in METADATA_ADDRESSES:
        return "cloud metadata"
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv4-mapped or NAT64 address is its IPv4 address (NAT64: an IPv6-only host
        # reaching an IPv4 PSA); a 6to4 one must pass as itself and as what it embeds.
        if (translated := _translated(ip)) is not None:
            return address_problem(translated)
        if ip.sixtofour is not None and (problem := address_problem(ip.sixtofour)):
            return problem
    for problem, hit in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                         ("multicast", ip.is_multicast), ("unspecified", ip.is_unspecified),
                         ("shared (CGNAT 100.64.0.0/10)", ip in _CGNAT), ("private", ip.is_private),
                         ("reserved", ip.is_reserved), ("non-public", not ip.is_global)):
        if hit:
            return problem
    return None


def _translated(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    return ip.ipv4_mapped or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)


def _is_metadata(ip: IP) -> bool:
    if ip in METADATA_ADDRESSES:
        return True
    return isinstance(ip, ipaddress.IPv6Address) and _translated(ip) in METADATA_ADDRESSES


def refusal(host: str, ip: IP, allow: Allowlist) -> str | None:
    """Why the worker must not connect to `ip` for `host` (None: it may). The message names
    the category, not the address a name resolved to: a tenant must not learn our internal
    DNS by pointing its PSA URL at our names."""
    what = f"{ip} is a" if _literal(normalise_host(host)) is not None else f"{host} resolves to a"
    if _is_metadata(ip):
        return f"{what} cloud metadata address; PSA calls never go there"
    if allow.allows_name(host) or allow.allows_address(ip):
        return None
    problem = address_problem(ip)
    if problem is None:
        return None
    return f"{what} {problem} address; the worker only calls public addresses unless the host is listed in {SETTING}"


def plain_http_refusal(host: str, allow: Allowlist) -> str | None:
    if allow.allows_name(host):
        return None
    return f"plain http:// to {host} is refused: PSA URLs must use https unless the host is listed in {SETTING}"


def resolve_checked(host: str, port: int, *, tls: bool, family: int = socket.AF_UNSPEC) -> list[tuple]:
    """getaddrinfo for `host`, every address checked: the one look-up a new connection
    makes anyway. Raises PsaUnsafeDestination (refused) or socket.gaierror (no answer)."""
    allow = allowlist()
    name = normalise_host(host)
    if name in METADATA_NAMES:
        raise PsaUnsafeDestination(f"{host} is a cloud metadata name; PSA calls never go there")
    if (literal := _literal(name)) is not None and _is_metadata(literal):
        raise PsaUnsafeDestination(f"{host} is a cloud metadata address; PSA calls never go there")
    if not tls and (reason := plain_http_refusal(host, allow)):
        raise PsaUnsafeDestination(reason)
    infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    for *_, sockaddr in infos:
        # All or nothing: a rebinding answer that mixes a public and a private address is refused.
        if reason := refusal(host, ipaddress.ip_address(sockaddr[0].split("%", 1)[0]), allow):
            raise PsaUnsafeDestination(reason)
    return infos


def check_base_url(url: str) -> str:
    """Vet a PSA base URL when a connection is added; return it normalised (scheme and host
    lower-case, no trailing slash). A name must resolve now: a URL we cannot check is refused."""
    if not isinstance(url, str) or not url.strip():
        raise UnsafeUrlError("base_url is required")
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as err:
        raise UnsafeUrlError(f"base_url is not a valid URL ({err})") from None
    scheme, host = parts.scheme.lower(), parts.hostname
    if scheme not in ("http", "https") or not host:
        raise UnsafeUrlError(f"base_url must be an https:// URL with a host, got {text[:100]!r}")
    if parts.username is not None or parts.password is not None:
        raise UnsafeUrlError("base_url must not carry a user name or password; keys are stored separately")
    if parts.query or parts.fragment:
        raise UnsafeUrlError("base_url must not have a query string or fragment")
    try:
        if normalise_host(host) not in allowlist().names or normalise_host(host) in METADATA_NAMES:
            # A host the operator named is not looked up here: an on-prem name may resolve
            # only on the workers' network. The workers check every address when they connect.
            resolve_checked(host, port or (443 if scheme == "https" else 80), tls=scheme == "https")
    except PsaUnsafeDestination as err:
        raise UnsafeUrlError(f"base_url refused: {err.message}") from None
    except (socket.gaierror, UnicodeError):
        raise UnsafeUrlError(f"base_url refused: the host {host} does not resolve (it must resolve when the "
                             f"connection is added, so its address can be checked)") from None
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port is not None else "")
    return urlunsplit((scheme, netloc, parts.path.rstrip("/"), "", ""))


def check_proxied_url(url: str) -> None:
    """Through a forwarding proxy (plain http) the connection is to the proxy, so the target
    cannot be checked at connect time: require the explicit allowlist for plain http. https
    goes through a CONNECT tunnel, whose target transport checks when the tunnel opens."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "https" and (reason := plain_http_refusal(parts.hostname or "", allowlist())):
        raise PsaUnsafeDestination(reason)
