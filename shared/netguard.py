"""Outbound URL checks for provider and webhook URLs (SSRF guard).

Link-local and cloud-metadata addresses are refused unless allowed by a setting; loopback and private
LAN addresses are allowed by default (self-hosted ComfyUI/A1111 live there) and can be forbidden.
Checked at save time (the URL as written) and again before each request (what the name resolves to now).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

# Metadata endpoints that are not link-local (AWS IPv6, Alibaba, Oracle, ...).
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)
_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})


class OutboundUrlRefused(ValueError):
    """The URL must not be called; the message says why and which setting would allow it."""


@dataclass(frozen=True)
class OutboundPolicy:
    allow_link_local: bool = False
    allow_private: bool = True
    allow_loopback: bool = True


def _check_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address, policy: OutboundPolicy) -> None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if address in _METADATA_ADDRESSES or address.is_link_local:
        if not policy.allow_link_local:
            raise OutboundUrlRefused(
                f"{address} is a link-local or cloud-metadata address"
                " (set KILN_NETWORK_ALLOW_LINK_LOCAL=true to allow)"
            )
        return
    if address.is_loopback:
        if not policy.allow_loopback:
            raise OutboundUrlRefused(f"{address} is a loopback address (KILN_NETWORK_ALLOW_LOOPBACK=false)")
        return
    if address.is_unspecified or address.is_multicast or address.is_reserved:
        raise OutboundUrlRefused(f"{address} is not a routable address")
    if address.is_private and not policy.allow_private:
        raise OutboundUrlRefused(f"{address} is a private address (KILN_NETWORK_ALLOW_PRIVATE=false)")


def check_url_syntax(url: str, policy: OutboundPolicy) -> str:
    """Validate scheme/host and, for literal IPs, the address. Returns the host. No DNS."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a bad port
    except ValueError as exc:
        raise OutboundUrlRefused(f"not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise OutboundUrlRefused("must be an http:// or https:// URL")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise OutboundUrlRefused("the URL has no host")
    if parts.username or parts.password:
        raise OutboundUrlRefused("credentials in the URL are not allowed: use the API key field")
    if port == 0:
        raise OutboundUrlRefused("port 0 is not allowed")
    if host in _METADATA_HOSTS and not policy.allow_link_local:
        raise OutboundUrlRefused(f"{host} is a cloud-metadata host (set KILN_NETWORK_ALLOW_LINK_LOCAL=true)")
    try:
        _check_address(ipaddress.ip_address(host), policy)
    except ValueError as exc:
        if isinstance(exc, OutboundUrlRefused):
            raise
    return host


async def check_url_resolved(url: str, policy: OutboundPolicy) -> None:
    """Syntax check plus every address the host resolves to now (before each outbound request)."""
    host = check_url_syntax(url, policy)
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OutboundUrlRefused(f"cannot resolve {host}: {exc.strerror}") from exc
    for info in infos:
        _check_address(ipaddress.ip_address(info[4][0]), policy)
