"""`kiln batch submit FILE.jsonl` and `kiln batch status FILE.results.jsonl`: thousands of generations
from a file, safe to rerun.

- Each line is a create body (a JSON object), a JSON string, or bare text: a prompt. Blank lines are
  skipped; a line that starts like JSON but is not is reported, never sent.
- Each line's `Idempotency-Key` derives from the file's name, the line's number and its text: a rerun
  after a crash (or Ctrl-C) creates nothing twice, and lines already submitted are not sent again.
- Lines go out with bounded concurrency; a 429 is waited out (`Retry-After`) and the same line sent
  again; a network error or 5xx is retried a few times before the line is reported.
- Statuses are followed on the project's event stream, with a re-read of the unfinished ones now and
  then (events are best-effort); `FILE.results.jsonl` is rewritten (atomically) as lines finish.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from api.cli.client import (
    TERMINAL,
    KeyOption,
    UrlOption,
    async_client,
    describe_error,
    fail,
    image_extension,
    retry_after,
    target,
)

batch_app = typer.Typer(help="Submit a JSONL file of generations and follow it.", no_args_is_help=True)

SEND_ATTEMPTS = 5  # for network errors and 5xx; 429s are waited out without a limit
RECHECK_SECONDS = 20.0  # unfinished lines are re-read this often (events are best-effort)
WRITE_EVERY_SECONDS = 1.0
ERROR = "error"  # a line that was never created: bad line, refused body, API unreachable
LINE_MAX_CHARS = 64 * 1024


@dataclass
class LineResult:
    line: int
    id: str | None = None
    status: str | None = None
    imageUrl: str | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL or self.status == ERROR


def results_path(source: Path) -> Path:
    return source.with_name(source.name.removesuffix(".jsonl") + ".results.jsonl")


def idempotency_key(source: Path, number: int, text: str) -> str:
    digest = hashlib.sha256(f"{source.name}\n{number}\n{text}".encode()).hexdigest()
    return f"kiln-batch-{digest[:40]}"


def parse_line(text: str) -> dict[str, Any]:
    """The create body a line stands for; ValueError saying why it cannot be sent."""
    if len(text) > LINE_MAX_CHARS:
        raise ValueError(f"line longer than {LINE_MAX_CHARS} characters")
    if text[0] in '{["':
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"malformed JSON: {exc}") from None
        if isinstance(value, str):
            return {"prompt": value}
        if isinstance(value, dict):
            return value
        raise ValueError("a line is a create body (JSON object), a JSON string or a bare prompt")
    return {"prompt": text}


def read_lines(source: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line, streamed: a file of any length is never held whole."""
    with source.open(encoding="utf-8", errors="replace") as lines:
        for number, raw in enumerate(lines, 1):
            text = raw.strip()
            if text:
                yield number, text


def load_results(path: Path) -> dict[int, LineResult]:
    found: dict[int, LineResult] = {}
    if not path.exists():
        return found
    for raw in path.read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(raw)
            found[int(item["line"])] = LineResult(
                **{k: item.get(k) for k in ("line", "id", "status", "imageUrl", "error")}
            )
        except (ValueError, KeyError, TypeError):
            continue  # a torn line of an older run: that line is simply done again
    return found


def write_results(path: Path, results: dict[int, LineResult]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as out:
        for number in sorted(results):
            out.write(json.dumps(asdict(results[number])) + "\n")
    os.replace(temporary, path)


class Batch:
    """The state of one run: results by line, the HTTP client, the progress display."""

    def __init__(
        self, http: httpx.AsyncClient, results: dict[int, LineResult], out: Path, download: Path | None
    ):
        self.http = http
        self.results = results
        self.out = out
        self.download = download
        self.by_id = {r.id: r for r in results.values() if r.id}
        self.changed = asyncio.Event()
        self._written = 0.0

    def counts(self) -> Counter[str]:
        return Counter(r.status or "unsent" for r in self.results.values())

    def save(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._written >= WRITE_EVERY_SECONDS:
            write_results(self.out, self.results)
            self._written = now

    async def send(self, source: Path, number: int, text: str) -> None:
        result = self.results.setdefault(number, LineResult(number))
        try:
            body = parse_line(text)
        except ValueError as exc:
            result.status, result.error = ERROR, str(exc)
            return
        headers = {"Idempotency-Key": idempotency_key(source, number, text)}
        attempts = 0
        while True:
            response: httpx.Response | None
            try:
                response = await self.http.post("/api/v1/generations", json=body, headers=headers)
                problem = describe_error(response)
            except httpx.HTTPError as exc:
                response, problem = None, f"API unreachable: {exc}"
            if response is not None and response.status_code in (200, 201):
                record = response.json()["data"]
                result.error = None
                self.by_id[record["id"]] = result
                result.id = record["id"]
                await self.update(result, record)
                return
            if response is not None and response.status_code == 429:
                await asyncio.sleep(retry_after(response))  # the budget or the in-flight cap: wait it out
                continue
            attempts += 1
            if (response is not None and response.status_code < 500) or attempts >= SEND_ATTEMPTS:
                result.status, result.error = ERROR, problem
                return
            await asyncio.sleep(min(2**attempts, 30))

    async def update(self, result: LineResult, record: dict[str, Any]) -> None:
        result.status = record["status"]
        if record["status"] == "success":
            result.imageUrl = (record.get("outputImage") or {}).get("publicUrl")
            await self.save_image(result, record)
        elif record["status"] in TERMINAL:
            result.error = f"{record.get('errorCode')}: {record.get('errorMessage')}"
        self.changed.set()

    async def save_image(self, result: LineResult, record: dict[str, Any]) -> None:
        if self.download is None or not record.get("outputImageId"):
            return
        path = self.download / f"{result.line}-{record['id']}.{image_extension(record)}"
        if path.exists():
            return
        response = await self.http.get(f"/api/v1/images/{record['outputImageId']}/content")
        if response.status_code == 200:
            temporary = path.with_name(path.name + ".tmp")
            temporary.write_bytes(response.content)
            os.replace(temporary, path)
        else:
            result.error = f"image not saved: {describe_error(response)}"

    async def recheck(self, limit: asyncio.Semaphore) -> None:
        """Re-read every line created but not finished."""

        async def one(result: LineResult) -> None:
            async with limit:
                response = await self.http.get(f"/api/v1/generations/{result.id}")
                if response.status_code == 200:
                    await self.update(result, response.json()["data"])
                elif response.status_code == 404:
                    result.status, result.error = ERROR, "the generation no longer exists"

        await asyncio.gather(*(one(r) for r in self.results.values() if r.id and not r.done))

    async def follow_events(self) -> None:
        """Status events of the project: a finished line is read once, for its image and error."""
        while True:
            try:
                async with self.http.stream("GET", "/api/v1/generations/events", timeout=None) as response:
                    async for line in response.aiter_lines():
                        if not line.startswith("data:") or not line[5:].strip():
                            continue
                        event = json.loads(line[5:])
                        result = self.by_id.get(event.get("id"))
                        if result is not None and not result.done and event.get("status") in TERMINAL:
                            record = await self.http.get(f"/api/v1/generations/{result.id}")
                            if record.status_code == 200:
                                await self.update(result, record.json()["data"])
            except (httpx.HTTPError, ValueError):
                await asyncio.sleep(2)  # the API restarted or the stream broke: the rechecks cover the gap


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _describe(counts: Counter[str]) -> str:
    order = ("pending", "processing", "success", "failed", "cancelled", ERROR, "unsent")
    return "  ".join(f"{name} {counts[name]}" for name in order if counts[name])


async def _follow(batch: Batch, progress: Progress, task: Any, concurrency: int, wait: bool) -> None:
    limit = asyncio.Semaphore(concurrency)
    events = asyncio.create_task(batch.follow_events())
    try:
        next_check = 0.0
        while wait and not all(r.done for r in batch.results.values()):
            if time.monotonic() >= next_check:
                await batch.recheck(limit)
                next_check = time.monotonic() + RECHECK_SECONDS
            batch.changed.clear()
            progress.update(
                task,
                completed=sum(r.done for r in batch.results.values()),
                description=_describe(batch.counts()),
            )
            batch.save()
            try:
                await asyncio.wait_for(batch.changed.wait(), 1.0)
            except TimeoutError:
                pass
    finally:
        events.cancel()


def _exit_code(results: dict[int, LineResult]) -> int:
    return 1 if any(r.status in ("failed", "cancelled", ERROR) for r in results.values()) else 0


@batch_app.command("submit")
def submit(
    source: Annotated[
        Path,
        typer.Argument(
            exists=True, dir_okay=False, help="A .jsonl file: one create body or prompt per line."
        ),
    ],
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="Requests in flight at once.")] = 8,
    download: Annotated[Path | None, typer.Option(help="Save each image here as it finishes.")] = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Follow until every line has finished.")
    ] = True,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Create a generation per line (a rerun creates nothing twice), follow them, write FILE.results.jsonl;
    exit 1 when any line failed, was cancelled or could not be sent."""
    base, api_key = target(url, key)
    out = results_path(source)
    if download is not None:
        download.mkdir(parents=True, exist_ok=True)
    results = load_results(out)
    console = Console(stderr=True)

    async def run() -> None:
        async with async_client(base, api_key) as http:
            batch = Batch(http, results, out, download)
            with _progress(console) as progress:
                task = progress.add_task("sending", total=None)
                queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue(concurrency * 2)

                async def sender() -> None:
                    while (item := await queue.get()) is not None:
                        await batch.send(source, *item)
                        progress.update(task, description=_describe(batch.counts()))
                        batch.save()

                senders = [asyncio.create_task(sender()) for _ in range(concurrency)]
                total = 0
                for number, text in read_lines(source):
                    total += 1
                    known = results.get(number)
                    if known is None or known.id is None:
                        await queue.put((number, text))  # new, or not created last time: send it
                for _ in senders:
                    await queue.put(None)
                await asyncio.gather(*senders)
                progress.update(task, total=total)
                batch.save(force=True)
                await _follow(batch, progress, task, concurrency, wait)
            batch.save(force=True)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        raise fail(
            f"interrupted; rerun `kiln batch submit {source}` to go on (nothing is created twice)", 130
        ) from None
    _report(console, results, out)
    raise typer.Exit(_exit_code(results))


@batch_app.command("status")
def status(
    results_file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A FILE.results.jsonl.")],
    download: Annotated[Path | None, typer.Option(help="Save each finished image here.")] = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Follow until every line has finished.")
    ] = False,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Re-read every unfinished line of a results file and rewrite it; exit 1 when any failed."""
    base, api_key = target(url, key)
    if download is not None:
        download.mkdir(parents=True, exist_ok=True)
    results = load_results(results_file)
    console = Console(stderr=True)

    async def run() -> None:
        async with async_client(base, api_key) as http:
            batch = Batch(http, results, results_file, download)
            await batch.recheck(asyncio.Semaphore(8))
            if download is not None:  # lines that finished before: their images too
                for result in results.values():
                    if result.status == "success" and result.id:
                        record = await http.get(f"/api/v1/generations/{result.id}")
                        if record.status_code == 200:
                            await batch.save_image(result, record.json()["data"])
            with _progress(console) as progress:
                task = progress.add_task(_describe(batch.counts()), total=len(results))
                await _follow(batch, progress, task, 8, wait)
            batch.save(force=True)

    asyncio.run(run())
    _report(console, results, results_file)
    raise typer.Exit(_exit_code(results))


def _report(console: Console, results: dict[int, LineResult], out: Path) -> None:
    console.print(f"{_describe(Counter(r.status or 'unsent' for r in results.values()))}; results in {out}")
    for result in sorted(results.values(), key=lambda r: r.line):
        if result.status in ("failed", "cancelled", ERROR):
            console.print(f"  line {result.line}: {result.status}: {result.error}")
