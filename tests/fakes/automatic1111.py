"""A fake AUTOMATIC1111 WebUI API (plain ASGI) speaking the documented shapes, scriptable per test.

    from tests.fakes.automatic1111 import A1111Script, Reply, fake_automatic1111_app
    from tests.fakes.server import serve

    fake = fake_automatic1111_app(A1111Script(auth=("kiln", "s3cret")))
    with serve(fake) as url:
        connection = ProviderConnection(api_url=url, settings={"auth": "kiln:s3cret"})
        ...
    fake.txt2img_bodies                            # the JSON bodies POSTed to txt2img, in order
    fake.requests_to("POST", "/sdapi/v1/interrupt")

Routes: POST /sdapi/v1/txt2img, GET /sdapi/v1/sd-models, POST /sdapi/v1/interrupt,
GET /sdapi/v1/progress, GET|POST /sdapi/v1/options (recorded, so tests can assert it is never used).
`script.replies["POST /sdapi/v1/txt2img"] = [Reply(429, ...)]` serves scripted answers first (once each,
in order) for a route key "METHOD /path"; then the normal behaviour resumes. The answer is
`{images: [base64 PNG], parameters, info: "<JSON string with seed, all_seeds, infotexts, ...>"}`;
`seed: -1` draws a random seed like the WebUI.
"""

from __future__ import annotations

import base64
import json
import random
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from tests.fakes.comfyui import (
    Recorded,
    Reply,
    handle_lifespan,
    png,
    read_body,
    safe_json,
    send_reply,
    wait_for_disconnect,
)

__all__ = [
    "DEFAULT_MODELS",
    "A1111Script",
    "FakeAutomatic1111",
    "Recorded",
    "Reply",
    "fake_automatic1111_app",
]

VERSION = "v1.10.1"

DEFAULT_MODELS: list[dict[str, Any]] = [
    {
        "title": "sd_xl_base_1.0.safetensors [31e35c80fc]",
        "model_name": "sd_xl_base_1.0",
        "hash": "31e35c80fc",
        "sha256": "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b",
        "filename": "/models/Stable-diffusion/sd_xl_base_1.0.safetensors",
        "config": None,
    },
    {
        "title": "v1-5-pruned-emaonly.safetensors [6ce0161689]",
        "model_name": "v1-5-pruned-emaonly",
        "hash": "6ce0161689",
        "sha256": "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
        "filename": "/models/Stable-diffusion/v1-5-pruned-emaonly.safetensors",
        "config": None,
    },
]

# txt2img fields and the JSON types pydantic would accept for them (a wrong one answers 422).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "prompt": (str,),
    "negative_prompt": (str,),
    "seed": (int,),
    "steps": (int,),
    "cfg_scale": (int, float),
    "width": (int,),
    "height": (int,),
    "batch_size": (int,),
    "n_iter": (int,),
    "enable_hr": (bool,),
    "hr_scale": (int, float),
    "denoising_strength": (int, float),
    "restore_faces": (bool,),
    "tiling": (bool,),
    "sampler_name": (str,),
    "scheduler": (str,),
    "hr_upscaler": (str,),
    "override_settings": (dict,),
}


@dataclass
class A1111Script:
    auth: tuple[str, str] | None = None  # require HTTP Basic auth with these credentials (--api-auth)
    models: list[dict[str, Any]] = field(default_factory=lambda: [dict(m) for m in DEFAULT_MODELS])
    hang: bool = False  # txt2img answers only after /sdapi/v1/interrupt (or never, if the client leaves)
    no_images: bool = False  # 200 with `images: []`
    malformed_info: bool = False  # `info` is not JSON
    # Scripted answers served first, per route key ("POST /sdapi/v1/txt2img", "GET /sdapi/v1/sd-models").
    replies: dict[str, list[Reply]] = field(default_factory=dict)


class FakeAutomatic1111:
    """The ASGI app. `requests` records everything received."""

    def __init__(self, script: A1111Script | None = None) -> None:
        self.script = script or A1111Script()
        self.requests: list[Recorded] = []
        self.interrupted = False
        self._lock = threading.Lock()

    def requests_to(self, method: str, path_prefix: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path.startswith(path_prefix)]

    @property
    def txt2img_bodies(self) -> list[dict[str, Any]]:
        return [r.json for r in self.requests_to("POST", "/sdapi/v1/txt2img")]

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

        scripted = self.script.replies.get(f"{request.method} {request.path.rstrip('/')}")
        if scripted:
            await send_reply(send, receive, scripted.pop(0))
            return
        if self.script.auth and not self._authorized(headers.get("authorization", "")):
            # What FastAPI's HTTPBasic check in the WebUI answers.
            reply = Reply(
                401, json={"detail": "Incorrect username or password"}, headers={"WWW-Authenticate": "Basic"}
            )
            await send_reply(send, receive, reply)
            return
        if request.method == "POST" and request.path == "/sdapi/v1/txt2img":
            if self.script.hang:
                self.interrupted = False
                # Like the WebUI, an interrupt ends the job early and the answer still comes.
                released = await wait_for_disconnect(receive, until=lambda: self.interrupted)
                if not released:
                    return
            await send_reply(send, receive, self._txt2img(request))
            return
        await send_reply(send, receive, self._handle(request))

    def _authorized(self, header: str) -> bool:
        assert self.script.auth is not None
        expected = base64.b64encode(":".join(self.script.auth).encode()).decode()
        return header == f"Basic {expected}"

    def _handle(self, request: Recorded) -> Reply:
        method, path = request.method, request.path.rstrip("/")
        if method == "GET" and path == "/sdapi/v1/sd-models":
            return Reply(json=self.script.models)
        if method == "POST" and path == "/sdapi/v1/interrupt":
            self.interrupted = True
            return Reply(json=None)
        if method == "GET" and path == "/sdapi/v1/progress":
            return Reply(json={"progress": 0.0, "eta_relative": 0.0, "state": {}, "current_image": None})
        if path == "/sdapi/v1/options":
            return Reply(json={"sd_model_checkpoint": self.script.models[0]["title"]})
        return Reply(404, json={"detail": "Not Found"})

    def _txt2img(self, request: Recorded) -> Reply:
        payload = safe_json(request.body)
        if not isinstance(payload, dict):
            return Reply(
                422,
                json={
                    "detail": [
                        {"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}
                    ]
                },
            )
        problems = []
        for name, types in _FIELD_TYPES.items():
            value = payload.get(name)
            wrong_bool = isinstance(value, bool) and bool not in types
            if value is not None and (wrong_bool or not isinstance(value, types)):
                kind = types[0].__name__
                problems.append(
                    {"loc": ["body", name], "msg": f"value is not a valid {kind}", "type": "type_error"}
                )
        if problems:
            return Reply(422, json={"detail": problems})
        if self.script.no_images:
            return Reply(json={"images": [], "parameters": payload, "info": "{}"})

        seed = payload.get("seed", -1)
        if seed == -1:
            seed = random.randrange(2**32)
        width, height = payload.get("width", 512), payload.get("height", 512)
        if payload.get("enable_hr"):
            scale = payload.get("hr_scale", 2.0)
            width, height = round(width * scale), round(height * scale)
        width, height = max(8, min(width, 4096)), max(8, min(height, 4096))
        wanted = (payload.get("override_settings") or {}).get("sd_model_checkpoint")
        model = next(
            (m for m in self.script.models if wanted in (m["title"], m["model_name"])), self.script.models[0]
        )
        info = self._info(payload, seed, width, height, model)
        return Reply(
            json={
                "images": [base64.b64encode(png(width, height, seed)).decode()],
                "parameters": payload,
                "info": "{not json" if self.script.malformed_info else json.dumps(info),
            }
        )

    @staticmethod
    def _info(
        payload: dict[str, Any], seed: int, width: int, height: int, model: dict[str, Any]
    ) -> dict[str, Any]:
        prompt, negative = payload.get("prompt", ""), payload.get("negative_prompt", "")
        sampler = payload.get("sampler_name") or "Euler a"
        scheduler = payload.get("scheduler") or "Automatic"
        steps, cfg = payload.get("steps", 50), payload.get("cfg_scale", 7.0)
        infotext = (
            f"{prompt}\nNegative prompt: {negative}\nSteps: {steps}, Sampler: {sampler}, Schedule type: "
            f"{scheduler}, CFG scale: {cfg}, Seed: {seed}, Size: {width}x{height}, Model hash: "
            f"{model['hash']}, Model: {model['model_name']}, Version: {VERSION}"
        )
        return {
            "prompt": prompt,
            "all_prompts": [prompt],
            "negative_prompt": negative,
            "all_negative_prompts": [negative],
            "seed": seed,
            "all_seeds": [seed],
            "subseed": 1234,
            "all_subseeds": [1234],
            "subseed_strength": 0,
            "width": width,
            "height": height,
            "sampler_name": sampler,
            "cfg_scale": cfg,
            "steps": steps,
            "batch_size": 1,
            "restore_faces": payload.get("restore_faces", False),
            "face_restoration_model": None,
            "sd_model_name": model["model_name"],
            "sd_model_hash": model["hash"],
            "sd_vae_name": None,
            "sd_vae_hash": None,
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": payload.get("denoising_strength", 0),
            "extra_generation_params": {"Schedule type": scheduler},
            "index_of_first_image": 0,
            "infotexts": [infotext],
            "styles": [],
            "job_timestamp": "20250101120000",
            "clip_skip": 1,
            "is_using_inpainting_conditioning": False,
            "version": VERSION,
        }


def fake_automatic1111_app(script: A1111Script | None = None) -> FakeAutomatic1111:
    return FakeAutomatic1111(script)
