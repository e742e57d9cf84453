"""ComfyUI adapter: fill a stored API-format workflow through a node mapping, queue it, poll, download.

Connection settings:
- `workflow`: the graph in ComfyUI's API format (a dict or a JSON string of one).
- `nodes`: where request values go, a list of `{type, key, node_ids}` with `type` one of
  prompt|negative_prompt|model|width|height|steps|seed|cfg|image; each value is written into
  `workflow[node_id]["inputs"][key]`. Entries with empty `node_ids` are ignored; `image` entries are
  accepted but unused (text-to-image only). `tests/fakes/comfyui.py` has EXAMPLE_WORKFLOW/EXAMPLE_NODES.

Flow: `POST /prompt` -> poll `GET /history/{id}` (ComfyUI answers `{}` until done, also for unknown
ids, so the adapter keeps its own deadline) -> `GET /view` of the first output image. A cancelled or
timed-out job is removed from ComfyUI's queue and interrupted, so it stops using the GPU.
"""

from __future__ import annotations

import asyncio
import copy
import json
import secrets
import time
import uuid
from typing import Any, NamedTuple

import httpx

from shared.errors import ProviderPermanent, ProviderRetryable
from shared.jsonlimits import decode_json_text
from shared.providers.base import (
    RAW_REQUEST_OVERRIDE,
    ModelInfo,
    OverrideRules,
    ParameterSpec,
    ProviderCapabilities,
    ProviderConnection,
    ProviderRequest,
    ProviderResult,
    raw_request_override_spec,
)
from shared.providers.vendor_http import (
    BAD_REQUEST,
    VendorHTTP,
    checked_parameters,
    describe_response,
    image_mime,
    response_json,
    truncate,
    vendor_message,
    with_override,
)
from shared.sizes import size_for_aspect_ratio

NAME = "comfyui"
DEFAULT_URL = "http://127.0.0.1:8188"

PARAMETERS: dict[str, ParameterSpec] = {
    "steps": ParameterSpec(
        "integer",
        min=1,
        max=150,
        step=1,
        description="Sampling steps, written into the workflow's `steps` node (default: the workflow's).",
        group="sampling",
    ),
    "cfg": ParameterSpec(
        "number",
        min=0,
        max=30,
        step=0.5,
        description="Classifier-free guidance scale, written into the `cfg` node (default: the workflow's).",
        group="sampling",
    ),
    "width": ParameterSpec(
        "integer",
        min=64,
        max=4096,
        step=64,
        description="Override the width derived from the aspect ratio (give height too).",
        group="size",
        requires=("height",),
    ),
    "height": ParameterSpec(
        "integer",
        min=64,
        max=4096,
        step=64,
        description="Override the height derived from the aspect ratio (give width too).",
        group="size",
        requires=("width",),
    ),
    RAW_REQUEST_OVERRIDE: raw_request_override_spec(
        '{"prompt": {"3": {"inputs": {"sampler_name": "dpmpp_2m"}}}}'
        " (the /prompt body is {prompt: <graph>, client_id})"
    ),
}


def _override_graph(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, ParameterSpec]]:
    """The connection's workflow, and the bounds of the node inputs a declared parameter is mapped to
    (an override of `prompt.<id>.inputs.steps` is held to `steps`' range). A broken setting: no nodes."""
    try:
        workflow = _load_json_setting(settings.get("workflow"), "workflow")
        nodes = _load_json_setting(settings.get("nodes") or [], "node mapping")
    except ProviderPermanent:
        return {}, {}
    if not isinstance(workflow, dict):
        return {}, {}
    bounds: dict[str, ParameterSpec] = {}
    for entry in nodes if isinstance(nodes, list) else []:
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind not in PARAMETERS:
            continue
        key = entry.get("key") or DEFAULT_KEYS[kind]
        node_ids = entry.get("node_ids") or []
        for node_id in node_ids if isinstance(node_ids, list) else [node_ids]:
            bounds[f"prompt.{node_id}.inputs.{key}"] = PARAMETERS[kind]
    return workflow, bounds


# Only `prompt.<node id>.inputs.<name>` of nodes the connection's workflow has: no new nodes (they
# could run anything installed on the server), no class_type change, no client_id/extra_data.
OVERRIDE_RULES = OverrideRules(keys=frozenset({"prompt"}), graph="prompt", graph_of=_override_graph)

CAPABILITIES = ProviderCapabilities(
    name="ComfyUI",
    parameters=PARAMETERS,
    api_key_required=False,  # self-hosted; a key is sent as a Bearer token only if one is set
    model_list_style="dynamic",
    static_models=(),
    default_url=DEFAULT_URL,
    default_model=None,
    override_rules=OVERRIDE_RULES,
)

NODE_TYPES = ("prompt", "negative_prompt", "model", "width", "height", "steps", "seed", "cfg", "image")
# Keys of the stock nodes (CLIPTextEncode, CheckpointLoaderSimple, EmptyLatentImage, KSampler), used
# when a mapping entry leaves `key` out.
DEFAULT_KEYS = {
    "prompt": "text",
    "negative_prompt": "text",
    "model": "ckpt_name",
    "width": "width",
    "height": "height",
    "steps": "steps",
    "seed": "seed",
    "cfg": "cfg",
    "image": "image",
}

MISCONFIGURED = "PROVIDER_MISCONFIGURED"
_FIRST_POLL = 0.2
_MAX_POLL = 1.0
_CLEANUP_TIMEOUT = 2.0  # cancellation must not wait long on a server that may be gone
_SEED_LIMIT = 2**32


def _error_text(response: httpx.Response) -> str:
    """The vendor's own words: ComfyUI errors are `{error: {message, details}}` or plain text."""
    data = response_json(response)
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            parts = [str(error.get(k)) for k in ("message", "details") if error.get(k)]
            if parts:
                return truncate(": ".join(parts))
    return truncate(vendor_message(data) or describe_response(response))


def _dump(value: Any, limit: int = 200) -> str:
    return truncate(json.dumps(value, default=str), limit)


def _userinfo(url: str) -> str:
    """`user:pass` of a URL like http://user:pass@host (a secret too), "" if none or unparsable."""
    try:
        return httpx.URL(url).userinfo.decode()
    except (httpx.InvalidURL, UnicodeDecodeError, TypeError):
        return ""


def _load_json_setting(value: Any, what: str) -> Any:
    if isinstance(value, str | bytes):
        try:
            return decode_json_text(value)  # depth-bounded: a 10,000-deep workflow string is refused
        except ValueError as exc:
            raise ProviderPermanent(MISCONFIGURED, f"ComfyUI {what} is not valid JSON: {exc}") from exc
    return value


def _json_value(value: Any) -> Any:
    """A setting that may be given as JSON text (a workflow pasted as a string): ValueError if malformed."""
    return decode_json_text(value) if isinstance(value, str) else value


def check_settings(settings: dict[str, Any]) -> list[dict[str, str]]:
    """A workflow in API format and a node mapping whose nodes exist in it: checked when the connection
    is saved, so a bad one is refused then and not at its first generation."""
    problems: list[dict[str, str]] = []

    def add(field: str, message: str) -> list[dict[str, str]]:
        problems.append({"field": field, "message": message})
        return problems

    try:
        workflow = _json_value(settings.get("workflow"))
    except ValueError as exc:
        return add("workflow", str(exc))
    if workflow is None:
        return add("workflow", "required for comfyui: the workflow in API format (object or JSON)")
    if not isinstance(workflow, dict) or not workflow:
        return add("workflow", "must be a non-empty object: the workflow in API format")
    if not all(isinstance(node, dict) for node in workflow.values()):
        return add("workflow", "every node must be an object ({class_type, inputs})")
    try:
        nodes = _json_value(settings.get("nodes"))
    except ValueError as exc:
        return add("nodes", str(exc))
    if not isinstance(nodes, list) or not nodes:
        return add("nodes", "required for comfyui: a list of {type, key, node_ids}")
    has_prompt = False
    for index, entry in enumerate(nodes):
        where = f"nodes[{index}]"
        if not isinstance(entry, dict):
            add(where, "must be an object {type, key, node_ids}")
            continue
        kind = entry.get("type")
        if kind not in NODE_TYPES:
            add(f"{where}.type", f"must be one of {', '.join(NODE_TYPES)}")
        key = entry.get("key")
        if key is not None and (not isinstance(key, str) or not key):
            add(f"{where}.key", "must be a non-empty string (the input name in the node)")
        node_ids = entry.get("node_ids")
        if not isinstance(node_ids, list) or not all(isinstance(n, str | int) for n in node_ids):
            add(f"{where}.node_ids", "must be a list of node ids")
            continue
        missing = [str(n) for n in node_ids if str(n) not in workflow]
        if missing:
            add(f"{where}.node_ids", f"not in the workflow: {', '.join(missing)}")
        elif kind == "prompt" and node_ids:
            has_prompt = True
    if not has_prompt and not problems:
        add("nodes", "needs a 'prompt' entry, or the prompt never reaches the workflow")
    return problems


class _Graph(NamedTuple):
    graph: dict[str, Any]
    seed: int | None  # the seed written into the graph; None if the mapping has no seed entry
    seed_at: tuple[str, str] | None  # (node id, input key) of the first seed input
    width: int
    height: int


class ComfyUIProvider:
    name = NAME

    def __init__(self, http: httpx.AsyncClient, connection: ProviderConnection) -> None:
        self._connection = connection
        self._base = (connection.api_url or DEFAULT_URL).rstrip("/")
        self._timeout = connection.timeout_seconds
        self._headers = {"Authorization": f"Bearer {connection.api_key}"} if connection.api_key else {}
        # Strings that must never reach an error message (vendors sometimes echo what they received).
        self._vendor = VendorHTTP(
            http, vendor="ComfyUI", timeout=self._timeout, secrets=(connection.api_key, _userinfo(self._base))
        )

    # --- ImageProvider -----------------------------------------------------------------------

    def size_for(self, aspect_ratio: str, model: str | None) -> tuple[int, int]:
        return size_for_aspect_ratio(aspect_ratio)

    async def generate(self, request: ProviderRequest) -> ProviderResult:
        deadline = time.monotonic() + self._timeout
        params = checked_parameters(PARAMETERS, request.parameters)
        built = self._build_graph(request, params)
        # Our own prompt_id (ComfyUI honours it since 2024) lets a cancel during the POST find the job.
        own_id = str(uuid.uuid4())
        # The override applies to the whole /prompt body: {"prompt": {"3": {"inputs": {...}}}} reaches a node.
        body = with_override(
            {"prompt": built.graph, "client_id": uuid.uuid4().hex, "prompt_id": own_id},
            request.parameters,
            OVERRIDE_RULES,
            self._connection,
        )
        seed = _seed_in(body.get("prompt"), built.seed_at, built.seed)  # the override may have set one

        try:
            prompt_id = await self._queue(body)
        except (asyncio.CancelledError, ProviderRetryable) as exc:
            # Cancelled or timed out mid-POST: the job may be queued anyway and would run for nobody.
            if isinstance(exc, asyncio.CancelledError) or isinstance(exc.__cause__, httpx.TimeoutException):
                await self._abandon(str(body.get("prompt_id") or own_id))
            raise
        try:
            entry = await self._wait(prompt_id, deadline)
        except BaseException:
            # Cancelled, past the deadline or the server failing mid-job: take the job off the GPU.
            await self._abandon(prompt_id)
            raise
        node_id, image = self._first_image(prompt_id, entry)
        data, mime = await self._download(image)
        return ProviderResult(
            images=[data],
            mime_type=mime,
            seed=seed,
            raw_meta={
                "provider": NAME,
                "prompt_id": prompt_id,
                "seed": seed,
                "output_node": node_id,
                "width": built.width,
                "height": built.height,
                "filename": image.get("filename"),
                "model": request.model or self._connection.model,
            },
        )

    async def list_models(self) -> list[ModelInfo]:
        resp = await self._call("GET", "/object_info/CheckpointLoaderSimple", what="listing models")
        data = self._json(resp, "model list")
        names: Any = None
        try:
            spec = data["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"]
            names = spec[0]
            if names == "COMBO":  # newer ComfyUI: ["COMBO", {"options": [...]}]
                names = spec[1]["options"]
        except (KeyError, IndexError, TypeError):
            names = None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise self._vendor.invalid(f"unexpected model list shape: {_dump(data)}")
        return [ModelInfo(id=n, label=_label(n)) for n in names]

    async def test(self) -> None:
        resp = await self._call("GET", "/system_stats", what="connection test")
        data = self._json(resp, "system stats")
        if not isinstance(data, dict):
            raise self._vendor.invalid(f"{self._base} does not look like ComfyUI (/system_stats)")

    # --- request building ----------------------------------------------------------------------

    def _workflow_and_nodes(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        settings = self._connection.settings or {}
        workflow = _load_json_setting(settings.get("workflow"), "workflow")
        if not isinstance(workflow, dict) or not workflow:
            raise ProviderPermanent(
                MISCONFIGURED,
                "the ComfyUI connection has no workflow (settings.workflow: a graph in API format)",
            )
        nodes = _load_json_setting(settings.get("nodes") or [], "node mapping")
        if not isinstance(nodes, list):
            raise ProviderPermanent(MISCONFIGURED, "ComfyUI settings.nodes must be a list")
        mapping: list[dict[str, Any]] = []
        for entry in nodes:
            kind = entry.get("type") if isinstance(entry, dict) else None
            if kind not in NODE_TYPES:
                raise ProviderPermanent(
                    MISCONFIGURED,
                    f"ComfyUI node mapping entry {_dump(entry, 100)} needs a type, one of "
                    + ", ".join(NODE_TYPES),
                )
            node_ids = entry.get("node_ids") or []
            if not isinstance(node_ids, list):
                node_ids = [node_ids]
            node_ids = [str(n) for n in node_ids]
            for node_id in node_ids:
                if not isinstance(workflow.get(node_id), dict):
                    raise ProviderPermanent(
                        MISCONFIGURED,
                        f"ComfyUI node mapping '{kind}' names node {node_id!r}, which is not in the workflow"
                        f" (nodes: {truncate(', '.join(workflow), 120)})",
                    )
            mapping.append(
                {"type": kind, "key": entry.get("key") or DEFAULT_KEYS[kind], "node_ids": node_ids}
            )
        if not any(m["type"] == "prompt" and m["node_ids"] for m in mapping):
            raise ProviderPermanent(
                MISCONFIGURED,
                "the ComfyUI node mapping has no 'prompt' entry: the prompt would never reach the workflow",
            )
        return workflow, mapping

    def _build_graph(self, request: ProviderRequest, params: dict[str, Any]) -> _Graph:
        workflow, mapping = self._workflow_and_nodes()
        graph = copy.deepcopy(workflow)  # the connection's workflow is shared by every job
        if "width" in params:
            width, height = params["width"], params["height"]
        elif request.width and request.height:
            width, height = request.width, request.height
        else:
            width, height = self.size_for(request.aspect_ratio, request.model)
        # A fresh seed every time: ComfyUI answers an identical graph from its cache with the old image.
        seed = request.seed if request.seed is not None else secrets.randbelow(_SEED_LIMIT)
        values: dict[str, Any] = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "model": request.model or self._connection.model,
            "width": width,
            "height": height,
            "steps": params.get("steps"),
            "cfg": params.get("cfg"),
            "seed": seed,
            "image": None,  # no reference images in text-to-image
        }
        seed_written = False
        for entry in mapping:
            value = values[entry["type"]]
            if value is None:
                continue  # not given: the workflow's own value stays
            for node_id in entry["node_ids"]:
                node = graph[node_id]
                inputs = node.get("inputs")
                if not isinstance(inputs, dict):
                    inputs = node["inputs"] = {}
                inputs[entry["key"]] = value
                seed_written = seed_written or entry["type"] == "seed"
        seed_at = next(
            ((m["node_ids"][0], m["key"]) for m in mapping if m["type"] == "seed" and m["node_ids"]), None
        )
        return _Graph(graph, seed if seed_written else None, seed_at, width, height)

    # --- the job -------------------------------------------------------------------------------

    async def _queue(self, body: dict[str, Any]) -> str:
        resp = await self._call("POST", "/prompt", json_body=body, what="queueing the workflow", check=False)
        if resp.status_code == 400:
            raise ProviderPermanent(BAD_REQUEST, self._vendor.clean(self._rejection(resp)))
        self._raise_for_status(resp, "queueing the workflow")
        data = self._json(resp, "/prompt answer")
        if not isinstance(data, dict):
            raise self._vendor.invalid(f"/prompt answered {_dump(data)}")
        if data.get("node_errors"):
            raise ProviderPermanent(BAD_REQUEST, self._vendor.clean(self._rejection(resp)))
        if data.get("error"):
            raise self._vendor.invalid(f"/prompt answered 200 with an error: {_error_text(resp)}")
        prompt_id = data.get("prompt_id")
        if not isinstance(prompt_id, str) or not prompt_id:
            raise self._vendor.invalid(f"/prompt answered without a prompt_id: {_dump(data)}")
        return prompt_id

    def _rejection(self, resp: httpx.Response) -> str:
        """`{error: {message, details}, node_errors: {id: {class_type, errors: [{message, details}]}}}`."""
        data = response_json(resp)
        parts = []
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            parts.append(": ".join(str(error[k]) for k in ("message", "details") if error.get(k)))
        elif error:
            parts.append(str(error))
        node_errors = data.get("node_errors") if isinstance(data, dict) else None
        if isinstance(node_errors, dict):
            for node_id, info in node_errors.items():
                info = info if isinstance(info, dict) else {}
                problems = [
                    ": ".join(str(e[k]) for k in ("message", "details") if e.get(k))
                    for e in info.get("errors") or []
                    if isinstance(e, dict)
                ]
                parts.append(f"node {node_id} ({info.get('class_type', '?')}): {'; '.join(problems) or '?'}")
        text = "; ".join(p for p in parts if p) or describe_response(resp)
        return f"ComfyUI rejected the workflow: {truncate(text)}"

    async def _wait(self, prompt_id: str, deadline: float) -> dict[str, Any]:
        interval = _FIRST_POLL
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timed_out(prompt_id)
            resp = await self._call(
                "GET",
                f"/history/{prompt_id}",
                what="waiting for the job",
                limit_s=min(self._timeout, remaining),
            )
            data = self._json(resp, "history")
            if not isinstance(data, dict):
                raise self._vendor.invalid(f"/history answered {_dump(data)}")
            entry = data.get(prompt_id)
            if entry:
                if not isinstance(entry, dict):
                    raise self._vendor.invalid(f"/history entry is {_dump(entry)}")
                return entry
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timed_out(prompt_id)
            await asyncio.sleep(min(interval, remaining))
            interval = min(interval * 1.5, _MAX_POLL)

    def _timed_out(self, prompt_id: str) -> ProviderRetryable:
        return ProviderRetryable(
            f"ComfyUI job {prompt_id} did not finish within the {self._timeout:g} s timeout"
        )

    def _first_image(self, prompt_id: str, entry: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        status = entry.get("status")
        if isinstance(status, dict) and status.get("status_str") == "error":
            self._raise_execution_error(prompt_id, status)
        outputs = entry.get("outputs")
        candidates: list[tuple[str, dict[str, Any]]] = []
        if isinstance(outputs, dict):
            for node_id, output in outputs.items():
                images = output.get("images") if isinstance(output, dict) else None
                for image in images if isinstance(images, list) else []:
                    if isinstance(image, dict) and isinstance(image.get("filename"), str):
                        candidates.append((str(node_id), image))
        if not candidates:
            raise self._vendor.invalid(f"job {prompt_id} finished without an output image")
        # SaveImage results ("output") before previews ("temp").
        saved = [c for c in candidates if c[1].get("type", "output") == "output"]
        return (saved or candidates)[0]

    def _raise_execution_error(self, prompt_id: str, status: dict[str, Any]) -> None:
        messages = status.get("messages")
        for message in messages if isinstance(messages, list) else []:
            if not (isinstance(message, list | tuple) and len(message) == 2 and isinstance(message[1], dict)):
                continue
            event, info = message
            if event == "execution_error":
                where = f"node {info.get('node_id', '?')} ({info.get('node_type', '?')})"
                kind = f"{info['exception_type']}: " if info.get("exception_type") else ""
                text = f"{kind}{info.get('exception_message', '')}"
                raise ProviderPermanent(
                    "PROVIDER_ERROR", self._vendor.clean(f"ComfyUI execution failed in {where}: {text}")
                )
            if event == "execution_interrupted":
                # Someone pressed cancel on the server: nothing wrong with the job itself.
                raise ProviderRetryable(f"ComfyUI job {prompt_id} was interrupted on the server")
        raise ProviderPermanent("PROVIDER_ERROR", f"ComfyUI job {prompt_id} failed without an error message")

    async def _download(self, image: dict[str, Any]) -> tuple[bytes, str]:
        query = {
            "filename": image["filename"],
            "subfolder": str(image.get("subfolder") or ""),
            "type": str(image.get("type") or "output"),
        }
        resp = await self._call("GET", "/view", params=query, what="downloading the image", image=True)
        data = resp.content
        mime = image_mime(data)
        if mime is None:
            raise self._vendor.invalid(
                f"/view returned {len(data)} bytes that are not an image"
                f" ({resp.headers.get('content-type', 'no content type')})"
            )
        return data, mime

    async def _abandon(self, prompt_id: str) -> None:
        """Best effort, never raises: drop the job from the queue if pending, interrupt it if running."""
        # Queue deletion first: a pending job must not start between the two calls.
        for path, body in (("/queue", {"delete": [prompt_id]}), ("/interrupt", {"prompt_id": prompt_id})):
            try:
                await self._vendor.request(  # capped like every answer, though it is thrown away
                    "POST",
                    self._base + path,
                    json=body,
                    headers=self._headers,
                    timeout=min(self._timeout, _CLEANUP_TIMEOUT),
                )
            except Exception:  # noqa: S110 - cleanup of an abandoned job must not hide the real error
                pass

    # --- HTTP ----------------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        what: str,
        json_body: Any = None,
        params: dict[str, str] | None = None,
        limit_s: float | None = None,
        check: bool = True,
        image: bool = False,
    ) -> httpx.Response:
        # Transport failures: timeouts and a box that is down are retryable, a malformed URL is not.
        resp = await self._vendor.request(
            method,
            self._base + path,
            json=json_body,
            params=params,
            headers=self._headers,
            timeout=self._timeout if limit_s is None else limit_s,
            image=image,
        )
        if check:
            self._raise_for_status(resp, what)
        return resp

    def _raise_for_status(self, resp: httpx.Response, what: str) -> None:
        """401/403 auth, 429 (Retry-After) and 5xx retryable, other 4xx bad request."""
        if resp.status_code >= 400:
            raise self._vendor.error_for(resp, f"{_error_text(resp)} (while {what})")

    def _json(self, resp: httpx.Response, what: str) -> Any:
        data = response_json(resp)
        if data is None and resp.content.strip() != b"null":
            start = resp.content[:120].decode("utf-8", errors="replace")
            raise self._vendor.invalid(f"{what} is not JSON: {start or '(empty body)'}")
        return data


def _seed_in(graph: Any, seed_at: tuple[str, str] | None, seed: int | None) -> int | None:
    """The seed the graph will really run with (the override may have set another one)."""
    if seed_at is None or not isinstance(graph, dict):
        return seed
    node = graph.get(seed_at[0])
    inputs = node.get("inputs") if isinstance(node, dict) else None
    value = inputs.get(seed_at[1]) if isinstance(inputs, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else seed


def _label(filename: str) -> str:
    """`sdxl/juggernaut_v9.safetensors` -> `sdxl/juggernaut_v9`."""
    for ext in (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft"):
        if filename.lower().endswith(ext):
            return filename[: -len(ext)]
    return filename


def create(http: httpx.AsyncClient, connection: ProviderConnection) -> ComfyUIProvider:
    return ComfyUIProvider(http, connection)
