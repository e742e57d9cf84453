"""The outbound address policy (SSRF guard): which hosts and addresses Kiln may connect to.

Link-local and cloud-metadata addresses are refused unless a setting allows them; loopback and private
LAN addresses are allowed in embedded mode (a local ComfyUI/A1111 lives there) and refused in production
unless a setting, or the project's `outboundAllowHosts`, allows them. Addresses that are not routable
(`0.0.0.0/8`, multicast, reserved) are always refused. An IPv6 address that embeds an IPv4 one
(IPv4-mapped/-compatible, 6to4, Teredo, NAT64) is judged by the IPv4 address it reaches.

`check_url_syntax` judges a URL as written (save time, no DNS). The check that counts is made by
`shared.outbound` on the address each connection really goes to (`check_connect_target`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Metadata endpoints that are not link-local (AWS IPv6, Alibaba, Oracle, ...).
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)
_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})

_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # 0.x.y.z reaches the local host on Linux
_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # CGNAT, Tailscale: a private network
# Translators that put the IPv4 address in the last 32 bits: NAT64's well-known prefix and SIIT's
# IPv4-translated form.
_TRANSLATED_PREFIXES = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("::ffff:0:0:0/96"))
# NAT64 for local use: the operator picks where the IPv4 address sits. Read as the last 32 bits, and
# never better than private.
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")

ALLOW_HOSTS_MAX = 50
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


class OutboundUrlRefused(ValueError):
    """The URL must not be called; the message names the host and the setting that would allow it."""


class AddressClass(StrEnum):
    PUBLIC = "public"
    PRIVATE = "private"  # RFC 1918, CGNAT, IPv6 unique-local, other non-global ranges
    LOOPBACK = "loopback"
    LINK_LOCAL = "link-local"  # link-local and cloud-metadata addresses
    UNROUTABLE = "unroutable"  # 0.0.0.0/8, ::, multicast, reserved: never a server


@dataclass(frozen=True)
class OutboundPolicy:
    allow_link_local: bool = False
    allow_private: bool = True
    allow_loopback: bool = True
    # Hosts (names or IP literals, lower case) that may reach private and loopback addresses even when
    # the settings forbid them: the project's `outboundAllowHosts`. Link-local stays the setting's.
    allow_hosts: frozenset[str] = frozenset()

    def with_hosts(self, hosts: Iterable[str]) -> OutboundPolicy:
        extra = frozenset(normalize_host(h) for h in hosts if h)
        if extra <= self.allow_hosts:
            return self
        return OutboundPolicy(
            self.allow_link_local, self.allow_private, self.allow_loopback, self.allow_hosts | extra
        )


def normalize_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def allow_host_entry(value: str) -> str:
    """One `outboundAllowHosts` entry, normalized: a host name (ASCII/punycode) or an IP address, with
    no scheme, port or path: it is compared with the host each connection is made to."""
    host = normalize_host(value)
    literal = ip_literal(host)
    if literal is not None:
        return str(literal)
    if not host or len(host) > 253 or not all(_HOST_LABEL.match(label) for label in host.split(".")):
        raise ValueError("must be a host name or an IP address (no scheme, port or path)")
    return host


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form really reaches: mapped, compatible, 6to4, Teredo client, NAT64."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # (server, client): packets go to the client
    if any(address in prefix for prefix in _TRANSLATED_PREFIXES) or address in _LOCAL_NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _IPV4_COMPATIBLE and int(address) > 1:  # ::a.b.c.d (deprecated, still routed by some)
        return ipaddress.IPv4Address(int(address))
    return None


def classify(address: IPAddress) -> AddressClass:
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            kind = classify(embedded)
            if address in _LOCAL_NAT64 and kind is AddressClass.PUBLIC:
                return AddressClass.PRIVATE
            return kind
    if address in _METADATA_ADDRESSES or address.is_link_local:
        return AddressClass.LINK_LOCAL
    if address.is_loopback:
        return AddressClass.LOOPBACK
    if address.is_unspecified or address.is_multicast or address.is_reserved or address in _THIS_NETWORK:
        return AddressClass.UNROUTABLE
    if address in _SHARED_ADDRESS_SPACE or address.is_private or not address.is_global:
        return AddressClass.PRIVATE
    return AddressClass.PUBLIC


def check_address(address: IPAddress, policy: OutboundPolicy, host: str | None = None) -> None:
    """Raise OutboundUrlRefused if `policy` forbids connecting to `address` (reached through `host`)."""
    kind = classify(address)
    if kind is AddressClass.PUBLIC:
        return
    target = f"{host} ({address})" if host and host != str(address) else str(address)
    listed = host is not None and normalize_host(host) in policy.allow_hosts
    if kind is AddressClass.LINK_LOCAL:
        if not policy.allow_link_local:
            raise OutboundUrlRefused(
                f"{target} is a link-local or cloud-metadata address"
                " (set KILN_NETWORK_ALLOW_LINK_LOCAL=true to allow)"
            )
    elif kind is AddressClass.LOOPBACK:
        if not (policy.allow_loopback or listed):
            raise OutboundUrlRefused(
                f"{target} is a loopback address (set KILN_NETWORK_ALLOW_LOOPBACK=true,"
                " or add the host to the project's outboundAllowHosts)"
            )
    elif kind is AddressClass.PRIVATE:
        if not (policy.allow_private or listed):
            raise OutboundUrlRefused(
                f"{target} is a private address (set KILN_NETWORK_ALLOW_PRIVATE=true,"
                " or add the host to the project's outboundAllowHosts)"
            )
    else:
        raise OutboundUrlRefused(f"{target} is not a routable address")


def check_host_name(host: str, policy: OutboundPolicy) -> str:
    """The host, normalized; refused if it is a cloud-metadata name or a literal forbidden address."""
    name = normalize_host(host)
    if not name:
        raise OutboundUrlRefused("the URL has no host")
    if name in _METADATA_HOSTS and not policy.allow_link_local:
        raise OutboundUrlRefused(f"{name} is a cloud-metadata host (set KILN_NETWORK_ALLOW_LINK_LOCAL=true)")
    literal = ip_literal(name)
    if literal is not None:
        check_address(literal, policy, name)
    return name


def ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def check_url_syntax(url: str, policy: OutboundPolicy) -> str:
    """Validate scheme/host and, for literal IPs, the address. Returns the host. No DNS."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a bad port
    except ValueError as exc:
        raise OutboundUrlRefused(f"not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise OutboundUrlRefused("must be an http:// or https:// URL")
    if parts.username or parts.password:
        raise OutboundUrlRefused("credentials in the URL are not allowed: use the API key field")
    if port == 0:
        raise OutboundUrlRefused("port 0 is not allowed")
    return check_host_name(parts.hostname or "", policy)
