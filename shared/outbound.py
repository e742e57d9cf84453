"""The one HTTP client for everything Kiln sends out: provider calls, URLs taken from a provider's
answer, connection `/models` and `/test`, webhooks.

- The address policy (`shared.netguard`) is enforced on the address each connection really goes to:
  the host is resolved once, every address is checked, and the socket is opened to a checked IP; TLS
  still uses the original host name for SNI and the certificate. A name that resolves to a public
  address for the check and to 127.0.0.1 for the connect (DNS rebinding) has nothing to slip through.
- Connection pools are kept per policy, so a connection opened under a project's looser policy (its
  `outboundAllowHosts`) never serves a request made under a stricter one. The policy of a request is the
  one set with `outbound_policy()` around it (the project's), else the client's own (the settings').
- Redirects are not followed; `fetch()` follows them where a vendor needs it, each hop connecting
  through the same guard, and reads a body with a cap on its *decoded* size (gzip bombs, endless bodies).
- Environment proxies are ignored: a proxy would connect on our behalf, past the address check.
- No cookies are kept: the worker's one client serves every project.

Code that calls out (the LLM prompt engine too: shared.enhancer_llm) takes its client from
`outbound_client()` or is handed one; it never makes its own httpx client (tests/unit/test_outbound.py
checks).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
import zlib
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import httpcore
import httpx

from shared.netguard import OutboundPolicy, OutboundUrlRefused, check_address, check_host_name, ip_literal

MIB = 1024 * 1024
DEFAULT_MAX_IMAGE_RESPONSE_BYTES = 64 * MIB
# Model lists, job status, errors: no JSON answer without an image in it comes near this.
MAX_JSON_RESPONSE_BYTES = 8 * MIB
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# The body is decoded by httpx; these headers describe the encoded one and would mislead a reader.
_ENCODING_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})

# (host, port) -> the addresses it resolves to now. Injectable so tests can play a rebinding DNS.
Resolver = Callable[[str, int], Awaitable[list[str]]]

_request_policy: ContextVar[OutboundPolicy | None] = ContextVar("kiln_outbound_policy", default=None)


class ResponseTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"the answer is larger than {limit} bytes")


@contextmanager
def outbound_policy(policy: OutboundPolicy) -> Iterator[None]:
    """Requests made inside (in this task and tasks it starts) are checked against `policy`."""
    token = _request_policy.set(policy)
    try:
        yield
    finally:
        _request_policy.reset(token)


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, but `connect_tcp` connects only to addresses the policy allows."""

    def __init__(
        self,
        policy: OutboundPolicy,
        resolver: Resolver = system_resolver,
        backend: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self.policy = policy
        self.resolver = resolver
        self.backend = backend or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        name = check_host_name(host, self.policy)
        addresses = await self._resolve(name, port, timeout)
        for address in addresses:  # all of them: a round-robin answer must not smuggle one in
            check_address(address, self.policy, name)
        failure: Exception | None = None
        for address in addresses:
            try:
                # The checked IP, never the name again: nothing can re-resolve between check and connect.
                return await self.backend.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def _resolve(
        self,
        name: str,
        port: int,
        timeout: float | None,  # noqa: ASYNC109 - httpcore's connect timeout
    ) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        literal = ip_literal(name)
        if literal is not None:
            return [literal]
        try:
            async with asyncio.timeout(timeout):
                found = await self.resolver(name, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {name} timed out") from None
        except OSError as exc:  # socket.gaierror: may resolve later, so a connect error (retryable)
            raise httpcore.ConnectError(f"cannot resolve {name}: {exc.strerror or exc}") from exc
        try:
            addresses = [ipaddress.ip_address(a) for a in found]
        except ValueError as exc:
            raise httpcore.ConnectError(f"{name} resolves to something that is not an address") from exc
        if not addresses:
            raise httpcore.ConnectError(f"{name} resolves to no address")
        return addresses

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        raise OutboundUrlRefused("unix sockets are not an outbound address")

    async def sleep(self, seconds: float) -> None:
        await self.backend.sleep(seconds)


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Loading the CA bundle takes a while; one context serves every pool (and the short-lived clients
    # of the connection routes).
    return httpx.create_ssl_context()


class GuardedTransport(httpx.AsyncBaseTransport):
    """A connection pool per policy, each connecting through a `GuardedNetworkBackend`."""

    def __init__(self, policy: OutboundPolicy, resolver: Resolver = system_resolver) -> None:
        self.policy = policy
        self.resolver = resolver
        # Policies differ only by a project's allowlist, which admins set: a handful, never per request.
        self._pools: dict[OutboundPolicy, httpx.AsyncHTTPTransport] = {}

    def pool_for(self, policy: OutboundPolicy) -> httpx.AsyncHTTPTransport:
        pool = self._pools.get(policy)
        if pool is None:
            pool = httpx.AsyncHTTPTransport(verify=_ssl_context())
            # httpx takes no network backend; its pool does. Same settings as httpx's own pool.
            pool._pool = httpcore.AsyncConnectionPool(
                ssl_context=_ssl_context(),
                max_connections=httpx.Limits().max_connections,
                max_keepalive_connections=httpx.Limits().max_keepalive_connections,
                keepalive_expiry=httpx.Limits().keepalive_expiry,
                network_backend=GuardedNetworkBackend(policy, self.resolver),
            )
            self._pools[policy] = pool
        return pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.pool_for(_request_policy.get() or self.policy).handle_async_request(request)

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.aclose()


class OutboundClient(httpx.AsyncClient):
    """An httpx client whose every connection is guarded; knows the response size caps."""

    def __init__(
        self,
        policy: OutboundPolicy,
        *,
        timeout: float,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_RESPONSE_BYTES,
        resolver: Resolver = system_resolver,
    ) -> None:
        super().__init__(
            transport=GuardedTransport(policy, resolver),
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            # No proxies or .netrc from the environment (httpx already skips proxies with a transport).
            trust_env=False,
            # One client serves every project: a cookie one vendor answer sets must not ride along on
            # another project's request to the same host. No cookie is ever kept.
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        )
        self.max_image_bytes = max_image_bytes


def outbound_client(
    settings: Any,
    timeout: float,
    *,
    policy: OutboundPolicy | None = None,
    resolver: Resolver = system_resolver,
) -> OutboundClient:
    """The client for `settings` (a `shared.settings.Settings`): its caps, and its network policy
    unless `policy` (a project's) is given."""
    return OutboundClient(
        policy or settings.network.policy(),
        timeout=timeout,
        max_image_bytes=settings.network.max_image_response_bytes,
        resolver=resolver,
    )


def max_image_bytes(client: httpx.AsyncClient) -> int:
    return client.max_image_bytes if isinstance(client, OutboundClient) else DEFAULT_MAX_IMAGE_RESPONSE_BYTES


async def fetch(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    max_bytes: int,
    max_redirects: int = 0,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    """Send and read the answer, at most `max_bytes` of it decoded (else ResponseTooLarge).

    With `max_redirects`, redirects are followed by hand: each hop connects through the guard again,
    turns into a GET without a body on 301/302/303, and carries `headers` and `auth` only while it stays
    on the first URL's origin (a key must not travel to wherever a redirect points). A redirect past the
    limit is returned as it is, for the caller to report.
    """
    auth = kwargs.pop("auth", httpx.USE_CLIENT_DEFAULT)
    origin = _origin(httpx.URL(url))
    current, hops = url, 0
    while True:
        same_origin = _origin(httpx.URL(current)) == origin
        request = client.build_request(method, current, headers=headers if same_origin else None, **kwargs)
        response = await client.send(request, stream=True, auth=auth if same_origin else None)
        try:
            location = response.headers.get("location")
            if response.status_code in REDIRECT_STATUSES and location and hops < max_redirects:
                hops += 1
                current = str(request.url.join(location))
                kwargs.pop("params", None)  # already part of the URL the server redirected from
                if response.status_code in (301, 302, 303) and method != "HEAD":
                    method = "GET"
                    for body_argument in ("content", "data", "files", "json"):
                        kwargs.pop(body_argument, None)
                continue
            body = await read_capped(response, max_bytes)
        finally:
            await response.aclose()
        return httpx.Response(
            status_code=response.status_code,
            headers=[(k, v) for k, v in response.headers.multi_items() if k.lower() not in _ENCODING_HEADERS],
            content=body,
            request=request,
            extensions=response.extensions,
        )


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


async def read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    """The decoded body of a streamed response, refused past `max_bytes`.

    Decoded here rather than by httpx, so that no single network chunk can inflate past the cap either
    (one 64 KiB gzip chunk can hold 64 MiB). One coding (gzip, deflate) at most: stacked codings
    multiply the ratio and no vendor sends them.
    """
    codings = [c.strip().lower() for c in response.headers.get("content-encoding", "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if len(codings) > 1 or (codings and codings[0] not in ("gzip", "x-gzip", "deflate")):
        raise httpx.DecodingError(f"unsupported content-encoding {response.headers['content-encoding']!r}")
    inflate = _Inflater(codings[0]) if codings else None
    body = bytearray()
    async for chunk in response.aiter_raw():
        room = max_bytes - len(body)
        data = inflate.decompress(chunk, room + 1) if inflate else chunk
        if len(data) > room:
            raise ResponseTooLarge(max_bytes)
        body += data
    if inflate is not None:
        tail = inflate.flush()
        if len(body) + len(tail) > max_bytes:
            raise ResponseTooLarge(max_bytes)
        body += tail
    return bytes(body)


class _Inflater:
    """gzip, or deflate with or without its zlib header (servers send both)."""

    def __init__(self, coding: str) -> None:
        self.raw_fallback = coding == "deflate"
        self.inflater = zlib.decompressobj(zlib.MAX_WBITS | 16 if coding != "deflate" else zlib.MAX_WBITS)

    def decompress(self, data: bytes, max_length: int) -> bytes:
        try:
            out = self.inflater.decompress(data, max_length)
        except zlib.error as exc:
            if not self.raw_fallback:
                raise httpx.DecodingError(f"the answer is not valid gzip: {exc}") from None
            self.raw_fallback = False
            self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            return self.decompress(data, max_length)
        self.raw_fallback = False
        return out

    def flush(self) -> bytes:
        try:
            return self.inflater.flush()
        except zlib.error as exc:
            raise httpx.DecodingError(f"the answer is not validly compressed: {exc}") from None
