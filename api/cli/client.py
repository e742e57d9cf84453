"""What the client commands (`kiln generate`, `kiln batch`, `kiln generations`) share: where the API
is, with which key, and how its answers read. The only place the CLI makes an HTTP client (it calls
Kiln's own API for the operator, not an outbound address: tests/unit/test_outbound.py exempts it)."""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import typer

from shared.settings import get_settings

UrlOption = Annotated[str | None, typer.Option(envvar="KILN_API_URL", help="API base URL.")]
KeyOption = Annotated[str | None, typer.Option(envvar="KILN_API_KEY", help="Project API key.")]
TERMINAL = frozenset({"success", "failed", "cancelled"})
# A 429's Retry-After is obeyed, within these bounds (a broken header must not stall or spin a batch).
MIN_WAIT_SECONDS, MAX_WAIT_SECONDS = 0.5, 60.0


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def target(url: str | None, key: str | None) -> tuple[str, str]:
    """(base URL, key): the options or their environment variables, else the local server's URL."""
    if not key:
        raise fail("no API key: pass --key or set KILN_API_KEY (`kiln dev` prints a demo key)", 2)
    return (url or get_settings().server.base_url).rstrip("/"), key


def client(url: str, key: str, timeout: float = 30) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=timeout)


def async_client(url: str, key: str, timeout: float = 30) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, timeout=timeout)


def unreachable(url: str, exc: Exception) -> typer.Exit:
    return fail(f"cannot reach {url}: {exc} (is `kiln dev` or `kiln api` running?)")


def retry_after(response: httpx.Response) -> float:
    try:
        seconds = float(response.headers.get("Retry-After", "5"))
    except ValueError:
        seconds = 5.0
    return min(max(seconds, MIN_WAIT_SECONDS), MAX_WAIT_SECONDS)


def describe_error(response: httpx.Response) -> str:
    """`<status> <CODE>: <message> (<field>: <problem>; ...)` from the API's error envelope."""
    try:
        err = response.json()["error"]
        details = "; ".join(f"{d['field']}: {d['message']}" for d in err.get("details") or [])
        return f"{response.status_code} {err['code']}: {err['message']}" + (
            f" ({details})" if details else ""
        )
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code}: {response.text[:200]}"


def image_extension(record: dict[str, Any]) -> str:
    mime = str((record.get("outputImage") or {}).get("mimeType"))
    return {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}.get(mime, "img")
