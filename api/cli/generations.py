"""`kiln generate` and `kiln generations list|get|cancel|watch`: the generations API from a terminal."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console

from api.cli.client import (
    TERMINAL,
    KeyOption,
    UrlOption,
    client,
    describe_error,
    fail,
    image_extension,
    retry_after,
    target,
    unreachable,
)

generations_app = typer.Typer(help="List, read, cancel and follow generations.", no_args_is_help=True)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the API's JSON.")]


def _line(record: dict[str, Any]) -> str:
    error = f"  {record.get('errorCode')}: {record.get('errorMessage')}" if record.get("errorCode") else ""
    return f"{record['id']}  {record['status']:<10}  {record['prompt'][:60]}{error}"


def _checked(response: httpx.Response, expected: int = 200) -> Any:
    if response.status_code != expected:
        raise fail(describe_error(response))
    return response.json()


def _call(url: str, key: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    with client(url, key) as http:
        try:
            return http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise unreachable(url, exc) from exc


@generations_app.command("list")
def list_generations(
    status: Annotated[
        str | None, typer.Option(help="pending, processing, success, failed, cancelled (or a comma list).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
    as_json: JsonFlag = False,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """The newest generations of the key's project."""
    base, api_key = target(url, key)
    params: dict[str, Any] = {"limit": limit, **({"status": status} if status else {})}
    answer = _checked(_call(base, api_key, "GET", "/api/v1/generations", params=params))
    if as_json:
        typer.echo(json.dumps(answer["data"]))
        return
    for record in answer["data"]:
        typer.echo(_line(record))


@generations_app.command("get")
def get_generation(
    generation_id: str, as_json: JsonFlag = False, url: UrlOption = None, key: KeyOption = None
) -> None:
    """One generation."""
    base, api_key = target(url, key)
    record = _checked(_call(base, api_key, "GET", f"/api/v1/generations/{generation_id}"))["data"]
    typer.echo(json.dumps(record) if as_json else _line(record))


@generations_app.command("cancel")
def cancel_generation(generation_id: str, url: UrlOption = None, key: KeyOption = None) -> None:
    """Cancel a pending or processing generation."""
    base, api_key = target(url, key)
    record = _checked(_call(base, api_key, "POST", f"/api/v1/generations/{generation_id}/cancel"))["data"]
    typer.echo(_line(record))


@generations_app.command("watch")
def watch_generation(generation_id: str, url: UrlOption = None, key: KeyOption = None) -> None:
    """Follow a generation's status changes (its event stream) until it ends; exit 1 unless it succeeded."""
    base, api_key = target(url, key)
    record: dict[str, Any] | None = None
    with client(base, api_key, timeout=None) as http:  # type: ignore[arg-type]
        try:
            with http.stream("GET", f"/api/v1/generations/{generation_id}/events") as response:
                if response.status_code != 200:
                    response.read()
                    raise fail(describe_error(response))
                for line in response.iter_lines():
                    if line.startswith("data:") and line[5:].strip():
                        record = json.loads(line[5:])
                        typer.echo(_line(record))
                        if record["status"] in TERMINAL:
                            break
        except httpx.HTTPError as exc:
            raise unreachable(base, exc) from exc
    if record is None or record["status"] != "success":
        raise typer.Exit(1)


def generate(
    prompt: str,
    aspect_ratio: Annotated[str, typer.Option("--aspect-ratio", "-a")] = "1:1",
    template: Annotated[str, typer.Option(help="Enhancement template.")] = "general",
    enhance: Annotated[bool, typer.Option("--enhance/--no-enhance", help="Prompt enhancement.")] = True,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the result and save it.")] = True,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to save the image.")] = None,
    parameters: Annotated[str | None, typer.Option(help="Provider parameters as JSON.")] = None,
    url: UrlOption = None,
    key: KeyOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait at most.")] = 600,
) -> None:
    """Create a generation; with --wait, show progress until it finishes and save the image."""
    console = Console(stderr=True)
    base, api_key = target(url, key)
    body: dict[str, Any] = {
        "prompt": prompt,
        "aspectRatio": aspect_ratio,
        "autoEnhance": enhance,
        "enhancementOptions": {"template": template},
    }
    if parameters:
        try:
            body["parameters"] = json.loads(parameters)
        except json.JSONDecodeError as exc:
            raise fail(f"--parameters is not JSON: {exc}", 2) from exc
    with client(base, api_key) as http:
        try:
            record = _checked(http.post("/api/v1/generations", json=body), 201)["data"]
        except httpx.HTTPError as exc:
            raise unreachable(base, exc) from exc
        console.print(f"generation [bold]{record['id']}[/] {record['status']}: {record['prompt'][:100]}")
        if not wait:
            typer.echo(json.dumps(record))
            return
        record = _poll_with_progress(http, record, timeout, console)
        if record["status"] != "success":
            raise fail(
                f"generation {record['status']}: {record.get('errorCode')}: {record.get('errorMessage')}"
            )
        image = record["outputImage"]
        content = http.get(image["storageUrl"])
        if content.status_code != 200:
            content = http.get(image["publicUrl"])
        target_path = output or Path(f"kiln-{record['id']}.{image_extension(record)}")
        target_path.write_bytes(content.content)
        console.print(
            f"saved {target_path} ({image['width']}x{image['height']}, {image['fileSize']} bytes) "
            f"in {record.get('processingTimeMs')} ms"
        )
        typer.echo(str(target_path))


def _poll_with_progress(
    http: httpx.Client, record: dict[str, Any], timeout: float, console: Console
) -> dict[str, Any]:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    deadline = time.monotonic() + timeout
    delay = 0.2
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(record["status"])
        while record["status"] in ("pending", "processing"):
            if time.monotonic() > deadline:
                where = f"/api/v1/generations/{record['id']}"
                raise fail(f"still {record['status']} after {timeout:.0f}s; poll GET {where}")
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)
            response = http.get(f"/api/v1/generations/{record['id']}")
            if response.status_code == 429:
                time.sleep(retry_after(response))
                continue
            record = _checked(response)["data"]
            retries = f", {record['retryCount']} retries" if record.get("retryCount") else ""
            progress.update(task, description=f"{record['status']}{retries}")
    return record
