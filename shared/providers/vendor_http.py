"""The vendor HTTP toolkit: turning vendors' HTTP answers and transport failures into the two provider errors.

Generic on purpose: every HTTP adapter (OpenAI-style, Google, NovelAI, ComfyUI, A1111, ...) can use it.

- `VendorHTTP` wraps the injected `httpx.AsyncClient`: one timeout per call, transport failures mapped
  (timeouts and connection errors are retryable, a malformed URL is permanent), the connection's
  secrets redacted from every message it builds, the answer read with a cap on its decoded size (the
  call site says whether it carries an image), an address the outbound policy refuses reported as
  PROVIDER_URL_FORBIDDEN naming the host.
- `status_error()` maps an HTTP status to an error with the common codes; adapters handle their vendor's
  special cases (safety blocks, quota codes) first and fall back to it.
- `vendor_message()` digs the human-readable message out of the usual JSON error shapes.
- `parse_retry_after()` reads `Retry-After` as seconds or as an HTTP date.
- `image_mime()` / `decode_base64_image()` check that what came back is really an image.
- `checked_parameters()` / `with_override()`: only declared parameters go out, the override merged last.

Messages quote what the vendor said, truncated to ~300 characters, and never contain a secret: vendors
sometimes echo the key back ("Incorrect API key provided: sk-...").
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from shared.errors import ProviderError, ProviderPermanent, ProviderRetryable
from shared.netguard import OutboundUrlRefused
from shared.outbound import MAX_JSON_RESPONSE_BYTES, ResponseTooLarge, fetch, max_image_bytes
from shared.providers.base import (
    RAW_REQUEST_OVERRIDE,
    OverrideRules,
    ParameterSpec,
    ProviderConnection,
    check_parameters,
    deep_merge,
    override_problems,
    parse_override,
)

MESSAGE_LIMIT = 300
_REDACTED = "[redacted]"
_MIN_SECRET_LENGTH = 4  # redacting "a" would shred every message; such a key is no secret anyway

AUTH_FAILED = "PROVIDER_AUTH_FAILED"
CONTENT_BLOCKED = "CONTENT_BLOCKED"
BAD_REQUEST = "PROVIDER_BAD_REQUEST"
QUOTA_EXCEEDED = "PROVIDER_QUOTA_EXCEEDED"
INVALID_OUTPUT = "INVALID_PROVIDER_OUTPUT"
URL_FORBIDDEN = "PROVIDER_URL_FORBIDDEN"
RESPONSE_TOO_LARGE = "PROVIDER_RESPONSE_TOO_LARGE"

# Statuses worth another try besides 429 and 5xx: request timeout, "too early".
_RETRYABLE_4XX = frozenset({408, 425, 429})

_SAFETY_WORDS = re.compile(
    r"safety system|content polic|moderation|prohibited content|unsafe content|nsfw|inappropriate content",
    re.IGNORECASE,
)


# --- message hygiene ---------------------------------------------------------------------------------


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every occurrence of each secret replaced (longest first, so overlaps go too)."""
    for secret in sorted({s for s in secrets if s and len(s) >= _MIN_SECRET_LENGTH}, key=len, reverse=True):
        text = text.replace(secret, _REDACTED)
    return text


def truncate(text: str, limit: int = MESSAGE_LIMIT) -> str:
    text = " ".join(text.split())  # vendors' HTML/JSON bodies span many lines; one line reads better
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def clean(text: str, secrets: Iterable[str | None] = (), limit: int = MESSAGE_LIMIT) -> str:
    """Redact first, then truncate: a cut through a key would otherwise leave its prefix visible."""
    return truncate(redact(text, secrets), limit)


def looks_like_safety_block(message: str | None) -> bool:
    """Heuristic for vendors that say "blocked for safety" only in words."""
    return bool(message and _SAFETY_WORDS.search(message))


# --- reading answers ---------------------------------------------------------------------------------


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP date; None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def response_json(response: httpx.Response) -> Any:
    """The body as JSON, or None if it is not JSON."""
    try:
        return json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return None


def vendor_message(payload: Any) -> str | None:
    """The message of the usual error shapes: `{error: {message}}`, `{error: "..."}`, `{message}`,
    `{detail}`, `{errors: [{message}]}`."""
    if isinstance(payload, list) and payload:
        return vendor_message(payload[0])
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    if isinstance(error, dict):
        found = vendor_message(error)
        if found:
            return found
    elif isinstance(error, str) and error:
        return error
    for key in ("message", "detail", "error_description", "msg"):
        value = payload.get(key)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, dict | list):
            found = vendor_message(value)
            if found:
                return found
    errors = payload.get("errors")
    if isinstance(errors, list) and errors:
        return vendor_message(errors[0])
    return None


def describe_response(response: httpx.Response) -> str:
    """What the vendor said: the JSON error message if there is one, else the start of the body."""
    message = vendor_message(response_json(response))
    if message:
        return message
    text = response.content[:2000].decode("utf-8", errors="replace").strip()
    return text or response.reason_phrase or "(empty body)"


# --- mapping ------------------------------------------------------------------------------------------


def status_error(
    vendor: str,
    status: int,
    message: str,
    *,
    retry_after: float | None = None,
    secrets: Iterable[str | None] = (),
) -> ProviderError:
    """The common mapping of an HTTP status (the message is cleaned here)."""
    said = clean(message, secrets)
    text = f"{vendor} answered HTTP {status}: {said}"
    if status in (401, 403):
        return ProviderPermanent(AUTH_FAILED, text)
    if status == 402:
        return ProviderPermanent(QUOTA_EXCEEDED, text)
    if status in _RETRYABLE_4XX or status >= 500:
        return ProviderRetryable(text, retry_after)
    if status == 451:
        return ProviderPermanent(CONTENT_BLOCKED, text)
    if 300 <= status < 400:
        return ProviderPermanent(BAD_REQUEST, f"{text} (redirected: check the connection's URL)")
    if 400 <= status < 500:
        return ProviderPermanent(BAD_REQUEST, text)
    return ProviderPermanent(INVALID_OUTPUT, text)


def invalid_output(vendor: str, what: str, secrets: Iterable[str | None] = ()) -> ProviderPermanent:
    return ProviderPermanent(INVALID_OUTPUT, f"{vendor}: {clean(what, secrets)}")


# --- images -------------------------------------------------------------------------------------------


def image_mime(data: bytes) -> str | None:
    """The MIME type from the bytes' magic (PNG, JPEG, WebP, GIF), None if it is none of them."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


def decode_base64_image(vendor: str, text: Any) -> tuple[bytes, str]:
    """(bytes, mime) of a base64 image (a `data:` URL prefix is tolerated); INVALID_PROVIDER_OUTPUT else."""
    if not isinstance(text, str) or not text:
        raise invalid_output(vendor, "the answer holds no image data")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_output(vendor, "the image data is not valid base64") from None
    return data, require_image(vendor, data)


def require_image(vendor: str, data: bytes) -> str:
    mime = image_mime(data)
    if mime is None:
        raise invalid_output(vendor, f"the answer is not a PNG, JPEG, WebP or GIF image ({len(data)} bytes)")
    return mime


# --- the client wrapper -------------------------------------------------------------------------------


class VendorHTTP:
    """The injected client with a per-call timeout, transport errors mapped and secrets redacted."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        vendor: str,
        timeout: float,
        secrets: Iterable[str | None] = (),
    ) -> None:
        self.http = http
        self.vendor = vendor
        self.timeout = timeout
        self.secrets = tuple(s for s in secrets if s)

    def clean(self, text: str) -> str:
        return clean(text, self.secrets)

    async def request(
        self, method: str, url: str, *, image: bool = False, max_redirects: int = 0, **kwargs: Any
    ) -> httpx.Response:
        """Send; an answer of any status is returned, only failures to get one are raised.

        `image`: the answer carries an image (binary, or base64 in JSON) and may be as large as
        KILN_NETWORK_MAX_IMAGE_RESPONSE_BYTES; any other answer is capped at 8 MiB. `max_redirects`:
        follow that many redirects (only where the vendor needs them), each hop checked again.
        """
        kwargs.setdefault("timeout", self.timeout)
        limit = max_image_bytes(self.http) if image else MAX_JSON_RESPONSE_BYTES
        try:
            return await fetch(self.http, method, url, max_bytes=limit, max_redirects=max_redirects, **kwargs)
        except OutboundUrlRefused as exc:
            # Refused before a byte was sent: the message names the host, no answer to quote.
            raise ProviderPermanent(URL_FORBIDDEN, f"{self.vendor}: refused to connect: {exc}") from exc
        except ResponseTooLarge as exc:
            setting = " (KILN_NETWORK_MAX_IMAGE_RESPONSE_BYTES)" if image else ""
            raise ProviderPermanent(
                RESPONSE_TOO_LARGE, f"{self.vendor}'s answer is larger than {exc.limit} bytes{setting}"
            ) from exc
        except httpx.TimeoutException as exc:
            kind = type(exc).__name__  # ConnectTimeout / ReadTimeout / WriteTimeout / PoolTimeout
            raise ProviderRetryable(
                f"{self.vendor} did not answer within the {self.timeout:g} s timeout ({kind})"
            ) from exc
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise ProviderPermanent(
                BAD_REQUEST, f"{self.vendor} URL is not usable: {self.clean(str(exc))}"
            ) from exc
        except httpx.TooManyRedirects as exc:
            raise ProviderPermanent(BAD_REQUEST, f"{self.vendor} redirected too many times") from exc
        except httpx.DecodingError as exc:
            raise invalid_output(self.vendor, f"undecodable answer: {exc}", self.secrets) from exc
        except httpx.TransportError as exc:
            detail = self.clean(str(exc) or type(exc).__name__)
            raise ProviderRetryable(f"could not reach {self.vendor}: {detail}") from exc

    def error_for(self, response: httpx.Response, message: str | None = None) -> ProviderError:
        """The common mapping for a non-2xx answer (Retry-After honoured)."""
        return status_error(
            self.vendor,
            response.status_code,
            message if message is not None else describe_response(response),
            retry_after=parse_retry_after(response.headers.get("retry-after")),
            secrets=self.secrets,
        )

    def invalid(self, what: str) -> ProviderPermanent:
        return invalid_output(self.vendor, what, self.secrets)

    def json_object(self, response: httpx.Response) -> dict[str, Any]:
        """A 2xx body that must be a JSON object; INVALID_PROVIDER_OUTPUT otherwise."""
        payload = response_json(response)
        if not isinstance(payload, dict):
            start = response.content[:200].decode("utf-8", errors="replace")
            raise self.invalid(f"expected a JSON object, got: {start or '(empty body)'}")
        return payload


# --- parameters and the request body -------------------------------------------------------------------


def checked_parameters(schema: dict[str, ParameterSpec], parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The request's parameters that `schema` declares, checked; everything else is dropped.

    Nothing outside the schema ever reaches a vendor. `rawRequestOverride` is left out (it may be an
    object or a JSON string; `with_override()` handles it). Bad values: INVALID_PARAMETERS.
    """
    given = {k: v for k, v in (parameters or {}).items() if k in schema and k != RAW_REQUEST_OVERRIDE}
    clean_values, problems = check_parameters(schema, given)
    if problems:
        text = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        raise ProviderPermanent("INVALID_PARAMETERS", text)
    return clean_values


def with_override(
    body: dict[str, Any],
    parameters: dict[str, Any] | None,
    rules: OverrideRules,
    connection: ProviderConnection,
) -> dict[str, Any]:
    """`parameters.rawRequestOverride` merged into `body` after the checks the API ran at create time,
    run again: a row stored before a rule existed must not send what it forbids. INVALID_PARAMETERS."""
    try:
        override = parse_override((parameters or {}).get(RAW_REQUEST_OVERRIDE))
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise ProviderPermanent("INVALID_PARAMETERS", f"parameters.{RAW_REQUEST_OVERRIDE}: {exc}") from None
    if override is None:
        return body
    problems = override_problems(rules, override, connection.overrides, connection.settings)
    if problems:
        text = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        raise ProviderPermanent("INVALID_PARAMETERS", text)
    return deep_merge(body, override)
