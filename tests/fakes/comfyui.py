"""A fake ComfyUI server (plain ASGI) speaking the documented shapes, scriptable per test.

    from tests.fakes.comfyui import EXAMPLE_SETTINGS, ComfyUIScript, Reply, fake_comfyui_app
    from tests.fakes.server import serve

    fake = fake_comfyui_app(ComfyUIScript(polls=2))
    with serve(fake) as url:
        connection = ProviderConnection(api_url=url, settings=EXAMPLE_SETTINGS)
        ...
    fake.prompts                         # the graphs POSTed to /prompt, in order
    fake.requests_to("POST", "/interrupt")

Routes: POST /prompt, GET /history/{id}, GET /view, POST /interrupt, POST /queue, GET /queue,
GET /system_stats, GET /object_info[/{class}]. `script.replies["POST /prompt"] = [Reply(429, ...)]`
serves scripted answers first (once each, in order) for a route key "METHOD /first-segment"
("GET /history", "GET /view", ...); then the normal behaviour resumes.

A test connection uses EXAMPLE_WORKFLOW (ComfyUI's stock text-to-image graph in API format) with
EXAMPLE_NODES, the node mapping: prompt -> 6.text, negative_prompt -> 7.text, model -> 4.ckpt_name,
width/height -> 5.width/height, steps/seed/cfg -> 3.steps/seed/cfg. Images are real PNGs of the
EmptyLatentImage size, coloured by the seed.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from PIL import Image

from tests.fakes.server import Recorded

EXAMPLE_WORKFLOW: dict[str, Any] = {
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 0,
            "steps": 20,
            "cfg": 7.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
    },
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}

EXAMPLE_NODES: list[dict[str, Any]] = [
    {"type": "prompt", "key": "text", "node_ids": ["6"]},
    {"type": "negative_prompt", "key": "text", "node_ids": ["7"]},
    {"type": "model", "key": "ckpt_name", "node_ids": ["4"]},
    {"type": "width", "key": "width", "node_ids": ["5"]},
    {"type": "height", "key": "height", "node_ids": ["5"]},
    {"type": "steps", "key": "steps", "node_ids": ["3"]},
    {"type": "seed", "key": "seed", "node_ids": ["3"]},
    {"type": "cfg", "key": "cfg", "node_ids": ["3"]},
]

# What `ProviderConnection.settings` of a test ComfyUI connection holds.
EXAMPLE_SETTINGS: dict[str, Any] = {"workflow": EXAMPLE_WORKFLOW, "nodes": EXAMPLE_NODES}

DEFAULT_MODELS = ["sd_xl_base_1.0.safetensors", "dreamshaper_8.safetensors", "flux/flux1-dev-fp8.safetensors"]

_UNSET: Any = object()


@dataclass
class Reply:
    """A scripted answer served instead of the normal behaviour (once)."""

    status: int = 200
    json: Any = _UNSET
    text: str | None = None  # a raw body, e.g. malformed JSON
    content: bytes | None = None  # raw bytes (an image)
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False  # never answer: wait until the client gives up and disconnects


@dataclass
class ComfyUIScript:
    polls: int = 0  # GET /history/{id} answers {} this many times before the job is done
    hang: bool = False  # jobs never finish (/history stays {}), like a busy queue
    execution_error: str | None = None  # jobs fail with this exception_message
    no_images: bool = False  # jobs finish without any image output
    output_type: str = "output"  # "temp" for PreviewImage-style outputs
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    combo_object_info: bool = False  # newer ComfyUI: ckpt_name = ["COMBO", {"options": [...]}]
    api_key: str | None = None  # require `Authorization: Bearer <api_key>` (auth proxy)
    # Scripted answers served first, per route key ("POST /prompt", "GET /history", "GET /view", ...).
    replies: dict[str, list[Reply]] = field(default_factory=dict)


def node_errors_reply(
    node_id: str = "4",
    class_type: str = "CheckpointLoaderSimple",
    message: str = "Value not in list",
    details: str = "ckpt_name: 'missing.safetensors' not in ['sd_xl_base_1.0.safetensors']",
    status: int = 400,
) -> Reply:
    """ComfyUI's answer to a graph that fails validation (400, or 200 with node_errors if asked)."""
    error = {"type": "value_not_in_list", "message": message, "details": details, "extra_info": {}}
    body: dict[str, Any] = {
        "node_errors": {node_id: {"errors": [error], "dependent_outputs": ["9"], "class_type": class_type}}
    }
    if status == 400:
        body["error"] = {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": "",
            "extra_info": {},
        }
    else:
        body.update(prompt_id=str(uuid.uuid4()), number=0)
    return Reply(status, json=body)


@dataclass
class _Job:
    prompt_id: str
    number: int
    graph: dict[str, Any]
    polls_left: int
    deleted: bool = False
    interrupted: bool = False


def png(width: int, height: int, seed: int = 0) -> bytes:
    """A real PNG: a flat colour derived from the seed (cheap at any size)."""
    colour = ((seed * 97) % 256, (seed * 57 + 80) % 256, (seed * 13 + 160) % 256)
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


class FakeComfyUI:
    """The ASGI app. `requests` records everything received; `jobs` the queued prompts."""

    def __init__(self, script: ComfyUIScript | None = None) -> None:
        self.script = script or ComfyUIScript()
        self.requests: list[Recorded] = []
        self.jobs: dict[str, _Job] = {}
        self.files: dict[tuple[str, str], bytes] = {}  # (type, filename) -> PNG
        self._lock = threading.Lock()
        self._counter = 0

    # --- what tests look at --------------------------------------------------------------------

    def requests_to(self, method: str, path_prefix: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path.startswith(path_prefix)]

    @property
    def prompts(self) -> list[Any]:
        """The graphs POSTed to /prompt (accepted or not), in order."""
        return [(r.json or {}).get("prompt") for r in self.requests_to("POST", "/prompt")]

    # --- ASGI ----------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await handle_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        query = dict(parse_qsl(scope.get("query_string", b"").decode(), keep_blank_values=True))
        request = Recorded(scope["method"], scope["path"], query, headers, body)
        with self._lock:
            self.requests.append(request)

        route = f"{request.method} /{request.path.strip('/').split('/')[0]}"
        scripted = self.script.replies.get(route)
        if scripted:
            await send_reply(send, receive, scripted.pop(0))
            return
        if self.script.api_key and headers.get("authorization") != f"Bearer {self.script.api_key}":
            await send_reply(send, receive, Reply(401, text="401: Unauthorized"))
            return
        await send_reply(send, receive, self._handle(request))

    def _handle(self, request: Recorded) -> Reply:
        method, path = request.method, request.path.rstrip("/")
        if method == "POST" and path == "/prompt":
            return self._queue_prompt(request)
        if method == "GET" and path.startswith("/history/"):
            return self._history(path.removeprefix("/history/"))
        if method == "GET" and path == "/history":
            return Reply(json={})
        if method == "GET" and path == "/view":
            data = self.files.get((request.query.get("type", "output"), request.query.get("filename", "")))
            if data is None:
                return Reply(404, text="404: Not Found")
            return Reply(content=data, headers={"content-type": "image/png"})
        if method == "POST" and path == "/interrupt":
            prompt_id = (safe_json(request.body) or {}).get("prompt_id")
            for job in self.jobs.values():
                if prompt_id in (None, job.prompt_id) and self._pending(job):  # only a running job
                    job.interrupted = True
            return Reply(json={})
        if method == "POST" and path == "/queue":
            payload = safe_json(request.body) or {}
            for prompt_id in payload.get("delete", []):
                if prompt_id in self.jobs:
                    self.jobs[prompt_id].deleted = True
            if payload.get("clear"):
                for job in self.jobs.values():
                    job.deleted = True
            return Reply(json={})
        if method == "GET" and path == "/queue":
            pending = [
                [j.number, j.prompt_id, j.graph, {}, ["9"]] for j in self.jobs.values() if self._pending(j)
            ]
            return Reply(json={"queue_running": pending[:1], "queue_pending": pending[1:]})
        if method == "GET" and path == "/system_stats":
            return Reply(json=_SYSTEM_STATS)
        if method == "GET" and path.startswith("/object_info"):
            return Reply(json=self._object_info(path.removeprefix("/object_info").strip("/")))
        return Reply(404, text="404: Not Found")

    def _pending(self, job: _Job) -> bool:
        return not (job.deleted or job.interrupted) and (self.script.hang or job.polls_left > 0)

    def _queue_prompt(self, request: Recorded) -> Reply:
        payload = safe_json(request.body)
        graph = payload.get("prompt") if isinstance(payload, dict) else None
        if not isinstance(graph, dict) or not graph:
            return Reply(400, json=_invalid_prompt("no prompt provided"))
        for node_id, node in graph.items():
            if not isinstance(node, dict) or "class_type" not in node:
                return Reply(
                    400, json=_invalid_prompt(f"Node ID '#{node_id}' is missing the class_type property.")
                )
        # Like ComfyUI: an unknown checkpoint fails validation with node_errors.
        for node_id, node in graph.items():
            ckpt = (node.get("inputs") or {}).get("ckpt_name")
            if node["class_type"] == "CheckpointLoaderSimple" and ckpt not in self.script.models:
                return node_errors_reply(
                    node_id, details=f"ckpt_name: '{ckpt}' not in {self.script.models}", status=400
                )
        with self._lock:
            self._counter += 1
            number = self._counter
        prompt_id = payload.get("prompt_id") or str(uuid.uuid4())
        self.jobs[prompt_id] = _Job(prompt_id, number, graph, self.script.polls)
        return Reply(json={"prompt_id": prompt_id, "number": number, "node_errors": {}})

    def _history(self, prompt_id: str) -> Reply:
        job = self.jobs.get(prompt_id)
        if job is None or job.deleted:
            return Reply(json={})  # ComfyUI: unknown ids (and dropped ones) answer {} forever
        if job.interrupted:
            return Reply(json={prompt_id: _entry(job, {}, "error", [_event("execution_interrupted", job)])})
        if self.script.hang:
            return Reply(json={})
        if job.polls_left > 0:
            job.polls_left -= 1
            return Reply(json={})
        if self.script.execution_error is not None:
            error = _event("execution_error", job)
            error[1].update(
                node_id="3",
                node_type="KSampler",
                exception_message=self.script.execution_error,
                exception_type="torch.OutOfMemoryError",
                traceback=['  File "execution.py", line 1, in fake\n'],
                current_inputs={},
                current_outputs={},
            )
            return Reply(json={prompt_id: _entry(job, {}, "error", [error])})
        outputs: dict[str, Any] = {}
        if not self.script.no_images:
            node_id = next((n for n, v in job.graph.items() if v.get("class_type") == "SaveImage"), "9")
            filename = f"ComfyUI_{job.number:05d}_.png"
            self.files[(self.script.output_type, filename)] = self._render(job.graph)
            outputs[node_id] = {
                "images": [{"filename": filename, "subfolder": "", "type": self.script.output_type}]
            }
        return Reply(json={prompt_id: _entry(job, outputs, "success", [_event("execution_success", job)])})

    def _render(self, graph: dict[str, Any]) -> bytes:
        width = height = 512
        seed = 0
        for node in graph.values():
            inputs = node.get("inputs") or {}
            if node.get("class_type") == "EmptyLatentImage":
                width, height = int(inputs.get("width", 512)), int(inputs.get("height", 512))
            if isinstance(inputs.get("seed"), int):
                seed = inputs["seed"]
        return png(max(8, min(width, 2048)), max(8, min(height, 2048)), seed)

    def _object_info(self, class_type: str) -> dict[str, Any]:
        models: Any = [list(self.script.models), {"tooltip": "The name of the checkpoint (model) to load."}]
        if self.script.combo_object_info:
            models = ["COMBO", {"options": list(self.script.models)}]
        info = {
            "CheckpointLoaderSimple": {
                "input": {"required": {"ckpt_name": models}},
                "output": ["MODEL", "CLIP", "VAE"],
                "name": "CheckpointLoaderSimple",
                "display_name": "Load Checkpoint",
                "category": "loaders",
            }
        }
        return info if not class_type or class_type in info else {}


def fake_comfyui_app(script: ComfyUIScript | None = None) -> FakeComfyUI:
    return FakeComfyUI(script)


# --- ComfyUI answer shapes -------------------------------------------------------------------

_SYSTEM_STATS = {
    "system": {
        "os": "posix",
        "ram_total": 67_108_864_000,
        "ram_free": 40_000_000_000,
        "comfyui_version": "0.3.40",
        "python_version": "3.11.9",
        "pytorch_version": "2.5.1+cu124",
        "embedded_python": False,
        "argv": ["main.py", "--listen"],
    },
    "devices": [
        {
            "name": "cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync",
            "type": "cuda",
            "index": 0,
            "vram_total": 25_393_692_672,
            "vram_free": 20_000_000_000,
            "torch_vram_total": 0,
            "torch_vram_free": 0,
        }
    ],
}


def _invalid_prompt(message: str) -> dict[str, Any]:
    return {
        "error": {"type": "invalid_prompt", "message": message, "details": "", "extra_info": {}},
        "node_errors": {},
    }


def _event(name: str, job: _Job) -> list[Any]:
    return [name, {"prompt_id": job.prompt_id, "timestamp": 1_700_000_000_000}]


def _entry(job: _Job, outputs: dict[str, Any], status: str, events: list[list[Any]]) -> dict[str, Any]:
    messages = [_event("execution_start", job), *events]
    return {
        "prompt": [job.number, job.prompt_id, job.graph, {}, list(outputs)],
        "outputs": outputs,
        "status": {"status_str": status, "completed": status == "success", "messages": messages},
        "meta": {},
    }


# --- tiny ASGI plumbing ----------------------------------------------------------------------


def safe_json(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


async def read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return body
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def wait_for_disconnect(
    receive: Any, limit: float = 60.0, until: Callable[[], bool] | None = None
) -> bool:
    """Hang like a stuck server until the client gives up (bounded, so the server can stop).

    True if `until()` became true first (e.g. the job was interrupted), False otherwise.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    waiter = asyncio.ensure_future(receive())
    try:
        while loop.time() < end:
            if waiter.done():
                if waiter.result()["type"] == "http.disconnect":
                    return False
                waiter = asyncio.ensure_future(receive())
            if until is not None and until():
                return True
            await asyncio.sleep(0.02)
        return False
    finally:
        waiter.cancel()


async def send_reply(send: Any, receive: Any, reply: Reply) -> None:
    if reply.hang:
        await wait_for_disconnect(receive)
        return
    headers = {k.lower(): v for k, v in reply.headers.items()}
    if reply.content is not None:
        body = reply.content
    elif reply.text is not None:
        body = reply.text.encode()
        headers.setdefault("content-type", "text/plain; charset=utf-8")
    elif reply.json is not _UNSET:
        body = json.dumps(reply.json).encode()
        headers.setdefault("content-type", "application/json")
    else:
        body = b""
    headers["content-length"] = str(len(body))
    await send(
        {
            "type": "http.response.start",
            "status": reply.status,
            "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def handle_lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
