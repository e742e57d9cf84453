"""The outbound guard: address classification, the connect-time check (DNS rebinding), redirects, and
the cap on decoded answer size. Real HTTP servers on 127.0.0.1; the resolver is injected so a name can
answer what a hostile DNS server would."""

from __future__ import annotations

import gzip
import ipaddress
import re
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest

from shared.errors import ProviderPermanent
from shared.netguard import AddressClass, OutboundPolicy, OutboundUrlRefused, check_address, classify
from shared.outbound import (
    MAX_JSON_RESPONSE_BYTES,
    GuardedNetworkBackend,
    OutboundClient,
    ResponseTooLarge,
    fetch,
    outbound_policy,
)
from shared.providers import openai
from shared.providers.base import ProviderConnection, ProviderRequest
from shared.providers.vendor_http import VendorHTTP
from shared.settings import Settings
from tests.fakes.openai import FakeOpenAI
from tests.fakes.server import serve, step

KEY = "sk-outbound-" + "x" * 20
CLOSED = OutboundPolicy(allow_link_local=False, allow_private=False, allow_loopback=False)
OPEN = OutboundPolicy(allow_link_local=False, allow_private=True, allow_loopback=True)

# --- classification ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("::ffff:169.254.169.254", AddressClass.LINK_LOCAL),  # IPv4-mapped
        ("::a9fe:a9fe", AddressClass.LINK_LOCAL),  # IPv4-compatible
        ("2002:a9fe:a9fe::", AddressClass.LINK_LOCAL),  # 6to4 of 169.254.169.254
        ("2001:0:4136:e378:8000:63bf:5601:5601", AddressClass.LINK_LOCAL),  # Teredo client 169.254.169.254
        ("64:ff9b::a9fe:a9fe", AddressClass.LINK_LOCAL),  # NAT64 well-known prefix
        ("64:ff9b:1::a9fe:a9fe", AddressClass.LINK_LOCAL),  # NAT64 local-use prefix
        ("64:ff9b:1::808:808", AddressClass.PRIVATE),  # local-use NAT64: never better than private
        ("::ffff:0:a9fe:a9fe", AddressClass.LINK_LOCAL),  # SIIT IPv4-translated
        ("64:ff9b::7f00:1", AddressClass.LOOPBACK),
        ("::ffff:127.0.0.1", AddressClass.LOOPBACK),
        ("2002:7f00:1::", AddressClass.LOOPBACK),
        ("::ffff:10.1.2.3", AddressClass.PRIVATE),
        ("2002:c0a8:0101::1", AddressClass.PRIVATE),  # 6to4 of 192.168.1.1
        ("100.64.0.1", AddressClass.PRIVATE),  # CGNAT / Tailscale
        ("100.127.255.254", AddressClass.PRIVATE),
        ("fd00::1", AddressClass.PRIVATE),  # unique-local
        ("fc00::1", AddressClass.PRIVATE),
        ("100.100.100.200", AddressClass.LINK_LOCAL),  # Alibaba metadata, inside CGNAT
        ("fd00:ec2::254", AddressClass.LINK_LOCAL),  # AWS IPv6 metadata, inside unique-local
        ("0.1.2.3", AddressClass.UNROUTABLE),  # 0.0.0.0/8 reaches the local host on Linux
        ("0.0.0.0", AddressClass.UNROUTABLE),
        ("::", AddressClass.UNROUTABLE),
        ("224.0.0.1", AddressClass.UNROUTABLE),
        ("255.255.255.255", AddressClass.UNROUTABLE),
        ("8.8.8.8", AddressClass.PUBLIC),
        ("2606:4700:4700::1111", AddressClass.PUBLIC),
        ("2002:808:808::1", AddressClass.PUBLIC),  # 6to4 of a public address is public
        ("64:ff9b::808:808", AddressClass.PUBLIC),
    ],
)
def test_every_form_of_an_address_is_judged_by_what_it_reaches(address: str, kind: AddressClass) -> None:
    assert classify(ipaddress.ip_address(address)) is kind


@pytest.mark.parametrize(
    "address",
    [
        "::ffff:169.254.169.254",
        "2002:a9fe:a9fe::",
        "2001:0:4136:e378:8000:63bf:5601:5601",
        "64:ff9b::a9fe:a9fe",
        "0.1.2.3",
    ],
)
def test_metadata_and_unroutable_forms_are_refused_with_private_and_loopback_allowed(address: str) -> None:
    with pytest.raises(OutboundUrlRefused):
        check_address(ipaddress.ip_address(address), OPEN)


@pytest.mark.parametrize("address", ["100.64.0.1", "fd00::1", "10.0.0.1", "::ffff:10.0.0.1", "127.0.0.1"])
def test_private_and_loopback_are_refused_when_the_policy_forbids_them(address: str) -> None:
    with pytest.raises(OutboundUrlRefused) as refused:
        check_address(ipaddress.ip_address(address), CLOSED, "gpu.lan")
    assert "gpu.lan" in str(refused.value) and "KILN_NETWORK_ALLOW_" in str(refused.value)
    check_address(ipaddress.ip_address(address), OPEN, "gpu.lan")


def test_a_listed_host_may_reach_private_and_loopback_but_never_metadata() -> None:
    listed = CLOSED.with_hosts(["GPU.lan."])
    check_address(ipaddress.ip_address("10.0.0.7"), listed, "gpu.lan")
    check_address(ipaddress.ip_address("127.0.0.1"), listed, "gpu.lan")
    with pytest.raises(OutboundUrlRefused):
        check_address(ipaddress.ip_address("10.0.0.7"), listed, "other.lan")
    with pytest.raises(OutboundUrlRefused):
        check_address(ipaddress.ip_address("169.254.169.254"), listed, "gpu.lan")


def test_no_code_makes_its_own_http_client() -> None:
    """One mechanism: an httpx client made anywhere else would connect past the guard."""
    root = Path(__file__).resolve().parents[2]
    # The guard itself; the CLI's client commands, which call Kiln's own API for the operator.
    exempt = {"shared/outbound.py", "api/cli/client.py"}
    makers = re.compile(r"httpx\.(Async)?(Client|HTTPTransport)\(|httpcore\.(Async)?ConnectionPool\(")
    offenders = [
        f"{path.relative_to(root)}:{number}"
        for folder in ("api", "shared", "worker")
        for path in sorted((root / folder).rglob("*.py"))
        if str(path.relative_to(root)) not in exempt
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if makers.search(line)
    ]
    assert offenders == []


# --- production defaults -----------------------------------------------------------------------------


def test_production_mode_refuses_private_and_loopback_unless_the_operator_allows_them() -> None:
    secret = "s" * 40
    assert Settings(mode="production", secret_key=secret).network.policy() == CLOSED
    assert Settings(mode="embedded").network.policy() == OPEN
    explicit = Settings(mode="production", secret_key=secret, network={"allow_loopback": True})
    assert explicit.network.policy() == OutboundPolicy(allow_private=False, allow_loopback=True)
    closed_embedded = Settings(mode="embedded", network={"allow_private": False})
    assert closed_embedded.network.policy() == OutboundPolicy(allow_private=False, allow_loopback=True)


# --- the connect-time check ----------------------------------------------------------------------------


class RebindingResolver:
    """Answers a public address the first time and 127.0.0.1 after: what a rebinding attacker's DNS does."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        return answer


class RecordingBackend(httpcore.AsyncNetworkBackend):
    """Where the guard really connects; refuses so that nothing leaves the machine."""

    def __init__(self) -> None:
        self.connected: list[str] = []

    async def connect_tcp(self, host: str, port: int, **_: Any) -> httpcore.AsyncNetworkStream:
        self.connected.append(host)
        raise httpcore.ConnectError("recorded")


async def test_the_connection_goes_to_the_address_that_was_checked_never_a_second_lookup() -> None:
    resolver = RebindingResolver(["93.184.216.34"], ["127.0.0.1"])
    recorder = RecordingBackend()
    guard = GuardedNetworkBackend(CLOSED, resolver, recorder)
    for _ in range(2):  # two connections: each resolves once and connects to what it checked
        with pytest.raises(OutboundUrlRefused if resolver.calls else httpcore.ConnectError):
            await guard.connect_tcp("rebind.example", 443, timeout=5)
    assert recorder.connected == ["93.184.216.34"]  # the second answer (127.0.0.1) was refused, not used
    assert resolver.calls == 2


async def test_a_name_with_one_forbidden_address_among_public_ones_is_refused() -> None:
    recorder = RecordingBackend()
    guard = GuardedNetworkBackend(CLOSED, RebindingResolver(["93.184.216.34", "127.0.0.1"]), recorder)
    with pytest.raises(OutboundUrlRefused) as refused:
        await guard.connect_tcp("mixed.example", 443, timeout=5)
    assert "mixed.example (127.0.0.1)" in str(refused.value)
    assert recorder.connected == []


async def hello_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    host = dict(scope["headers"]).get(b"host", b"").decode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": f"host={host}".encode()})


@pytest.fixture(scope="module")
def hello_url() -> Iterator[str]:
    with serve(hello_app) as url:
        yield url


def resolving_to_loopback(host: str) -> Any:
    async def resolve(name: str, port: int) -> list[str]:
        assert name == host
        return ["127.0.0.1"]

    return resolve


async def test_a_name_is_connected_to_by_its_checked_address_with_its_own_host_header(hello_url: str) -> None:
    port = httpx.URL(hello_url).port
    async with OutboundClient(OPEN, timeout=5, resolver=resolving_to_loopback("gpu.test")) as client:
        response = await client.get(f"http://gpu.test:{port}/")
    assert response.text == f"host=gpu.test:{port}"


async def test_the_policy_of_the_request_applies_and_pools_are_kept_apart(hello_url: str) -> None:
    port = httpx.URL(hello_url).port
    async with OutboundClient(CLOSED, timeout=5, resolver=resolving_to_loopback("gpu.test")) as client:
        with outbound_policy(CLOSED.with_hosts(["gpu.test"])):  # a project that listed the host
            assert (await client.get(f"http://gpu.test:{port}/")).status_code == 200
        # Same client, stricter policy: the kept-alive connection of the looser one must not serve it.
        with pytest.raises(OutboundUrlRefused) as refused:
            await client.get(f"http://gpu.test:{port}/")
    assert "gpu.test (127.0.0.1) is a loopback address" in str(refused.value)


async def test_no_cookie_a_vendor_sets_is_sent_again() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        sent = dict(scope["headers"]).get(b"cookie", b"")
        headers = [(b"set-cookie", b"session=project-a; Path=/")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"cookie=" + sent})

    async with OutboundClient(OPEN, timeout=5) as client:
        with serve(app) as url:
            first = await client.get(url)
            second = await client.get(url)  # another project's request, in the worker's shared client
    assert first.text == second.text == "cookie="


# --- provider answers: URLs, redirects, sizes ------------------------------------------------------------


def redirecting_app(location: str) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"location", location.encode())]
        await send({"type": "http.response.start", "status": 302, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    return app


def dall_e(http: httpx.AsyncClient, url: str) -> openai.OpenAIProvider:
    connection = ProviderConnection(api_url=url, api_key=KEY, model="dall-e-3", timeout_seconds=5)
    return openai.create(http, connection)


def prompt() -> ProviderRequest:
    return ProviderRequest(
        prompt="a kiln",
        negative_prompt=None,
        width=1024,
        height=1024,
        aspect_ratio="1:1",
        seed=None,
        model=None,
        parameters={},
    )


@pytest.fixture
async def guarded() -> AsyncIterator[OutboundClient]:
    async with OutboundClient(OPEN, timeout=5) as client:
        yield client


async def test_an_image_url_at_a_forbidden_address_fails_with_provider_url_forbidden(
    guarded: OutboundClient,
) -> None:
    fake = FakeOpenAI(step("url", base="http://169.254.169.254"), api_key=KEY)
    with serve(fake) as url:
        with pytest.raises(ProviderPermanent) as failed:
            await dall_e(guarded, url).generate(prompt())
    assert failed.value.code == "PROVIDER_URL_FORBIDDEN"
    assert "169.254.169.254" in failed.value.message and KEY not in failed.value.message


async def test_a_redirect_hop_to_a_forbidden_address_is_refused(guarded: OutboundClient) -> None:
    fake = FakeOpenAI(api_key=KEY)
    metadata = redirecting_app("http://[::ffff:169.254.169.254]/latest/meta-data/")
    with serve(metadata) as cdn, serve(fake) as url:
        fake.script("generate", step("url", base=cdn))
        with pytest.raises(ProviderPermanent) as failed:
            await dall_e(guarded, url).generate(prompt())
    assert failed.value.code == "PROVIDER_URL_FORBIDDEN"
    assert "169.254.169.254" in failed.value.message


async def test_a_signed_url_redirect_is_followed_and_the_key_stays_on_the_api_origin(
    guarded: OutboundClient,
) -> None:
    fake = FakeOpenAI(api_key=None)
    storage = FakeOpenAI()
    storage.files = fake.files  # the CDN serves what the API made

    async def api(scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The API answers a relative image URL on its own origin, which redirects to the CDN."""
        if scope["type"] == "http" and scope["path"].startswith("/files/"):
            api_hits.append(dict(scope["headers"]).get(b"authorization", b"").decode())
            headers = [(b"location", f"{storage_url}{scope['path']}".encode())]
            await send({"type": "http.response.start", "status": 302, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        await fake(scope, receive, send)

    api_hits: list[str] = []
    with serve(storage) as storage_url, serve(api) as url:
        fake.script("generate", step("url", relative=True))
        result = await dall_e(guarded, url).generate(prompt())
    assert result.mime_type == "image/png"
    assert api_hits == [f"Bearer {KEY}"]  # the first hop is the API's: it gets the key
    assert "authorization" not in storage.received("download")[-1].headers  # the CDN never does


async def test_an_error_from_the_image_host_is_not_quoted(guarded: OutboundClient) -> None:
    async def cdn_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 403, "headers": []})
            await send({"type": "http.response.body", "body": b"<h1>ATTACKER TEXT</h1>"})

    fake = FakeOpenAI(api_key=KEY)
    with serve(cdn_app) as cdn, serve(fake) as url:
        fake.script("generate", step("url", base=cdn))
        with pytest.raises(ProviderPermanent) as failed:
            await dall_e(guarded, url).generate(prompt())
    assert "ATTACKER" not in failed.value.message
    assert "127.0.0.1" in failed.value.message and "HTTP 403" in failed.value.message


def streaming_app(chunks: Any, encoding: str | None = None) -> Any:
    """Answers 200 with a chunked body from `chunks()` (an endless one, if it never stops)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"content-type", b"image/png")]
        if encoding:
            headers.append((b"content-encoding", encoding.encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for chunk in chunks():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


def endless_zeros() -> Iterator[bytes]:
    """1 GiB: endless as far as a 4 MiB cap goes, and the server thread still ends after a disconnect."""
    chunk = b"\0" * 65536
    for _ in range(16384):
        yield chunk


def gzip_bomb(decoded_mib: int) -> Iterator[bytes]:
    """A gzip stream of `decoded_mib` MiB of zeros, about 1/1000 of that on the wire."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = b"\0" * (1024 * 1024)
    for _ in range(decoded_mib):
        yield compressor.compress(block)
    yield compressor.flush()


@pytest.mark.parametrize(
    ("app", "what"),
    [
        (streaming_app(lambda: gzip_bomb(64), "gzip"), "gzip bomb"),
        (streaming_app(endless_zeros), "endless body"),
    ],
)
async def test_an_oversized_answer_fails_as_too_large_with_memory_bounded(app: Any, what: str) -> None:
    cap = 4 * 1024 * 1024
    async with OutboundClient(OPEN, timeout=30, max_image_bytes=cap) as client:
        vendor = VendorHTTP(client, vendor="Bomb", timeout=30)
        with serve(app) as url:
            tracemalloc.start()
            try:
                with pytest.raises(ProviderPermanent) as failed:
                    await vendor.request("GET", url, image=True)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
    assert failed.value.code == "PROVIDER_RESPONSE_TOO_LARGE", what
    assert "KILN_NETWORK_MAX_IMAGE_RESPONSE_BYTES" in failed.value.message
    assert peak < 3 * cap, f"{what}: {peak} bytes held for a {cap}-byte cap"


async def test_json_answers_have_their_own_smaller_cap(guarded: OutboundClient) -> None:
    big = b"[" + b"0," * (MAX_JSON_RESPONSE_BYTES // 2) + b"0]"
    with serve(streaming_app(lambda: iter([gzip.compress(big)]), "gzip")) as url:
        with pytest.raises(ResponseTooLarge):
            await fetch(guarded, "GET", url, max_bytes=MAX_JSON_RESPONSE_BYTES)
        with pytest.raises(ProviderPermanent) as failed:
            await VendorHTTP(guarded, vendor="Big", timeout=5).request("GET", url)
        assert failed.value.code == "PROVIDER_RESPONSE_TOO_LARGE"
        # The same answer is fine where an image is expected (64 MiB).
        response = await VendorHTTP(guarded, vendor="Big", timeout=5).request("GET", url, image=True)
    assert response.content == big and "content-encoding" not in response.headers


async def test_stacked_encodings_are_refused(guarded: OutboundClient) -> None:
    twice = gzip.compress(gzip.compress(b"\0" * 1024))
    with serve(streaming_app(lambda: iter([twice]), "gzip, gzip")) as url:
        with pytest.raises(ProviderPermanent) as failed:
            await VendorHTTP(guarded, vendor="Twice", timeout=5).request("GET", url, image=True)
    assert failed.value.code == "INVALID_PROVIDER_OUTPUT"


async def test_deflate_with_and_without_the_zlib_header_is_read(guarded: OutboundClient) -> None:
    body = b"hello " * 1000
    raw = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    for encoded in (zlib.compress(body), raw.compress(body) + raw.flush()):
        with serve(streaming_app(lambda encoded=encoded: iter([encoded]), "deflate")) as url:
            response = await fetch(guarded, "GET", url, max_bytes=len(body))
        assert response.content == body
