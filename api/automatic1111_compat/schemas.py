"""Automatic1111's web API shapes (stable-diffusion-webui modules/api/models.py), as the tools built for
it (Open WebUI's automatic1111 engine, SillyTavern) send and read them."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from api.generations.schemas import PROMPT_MAX_LENGTH, SEED_MAX

Side = Annotated[int, Meta(ge=64, le=2048)]


class Txt2ImgRequest(msgspec.Struct, kw_only=True):
    """`POST /sdapi/v1/txt2img`. Fields are A1111's, with its defaults; the many it has that Kiln has
    no use for (scripts, hires-fix second-pass prompts, ...) are accepted and ignored, as A1111 accepts
    fields its extensions do not read."""

    prompt: Annotated[str, Meta(max_length=PROMPT_MAX_LENGTH)] = ""
    negative_prompt: Annotated[str, Meta(max_length=PROMPT_MAX_LENGTH)] = ""
    width: Side = 512
    height: Side = 512
    steps: Annotated[int, Meta(ge=1, le=150)] = 50
    cfg_scale: Annotated[float, Meta(ge=0, le=30)] = 7.0
    seed: Annotated[int, Meta(ge=-1, le=SEED_MAX)] = -1
    sampler_name: Annotated[str, Meta(max_length=100)] | None = None
    sampler_index: Annotated[str, Meta(max_length=100)] | None = None  # the older name of sampler_name
    scheduler: Annotated[str, Meta(max_length=100)] | None = None
    batch_size: Annotated[int, Meta(ge=1, le=4)] = 1
    n_iter: Annotated[int, Meta(ge=1, le=4)] = 1
    restore_faces: bool | None = None
    tiling: bool | None = None
    enable_hr: bool = False
    hr_scale: Annotated[float, Meta(ge=1, le=4)] = 2.0
    hr_upscaler: Annotated[str, Meta(max_length=100)] | None = None
    denoising_strength: Annotated[float, Meta(ge=0, le=1)] | None = None
    override_settings: dict[str, Any] | None = None


class Txt2ImgResponse(msgspec.Struct):
    images: list[str]  # base64 of each image, no data: prefix
    parameters: dict[str, Any]  # the request as understood
    info: str  # a JSON document, as A1111 sends it


class SdModel(msgspec.Struct):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None = None


class Sampler(msgspec.Struct):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class Progress(msgspec.Struct):
    """`GET /sdapi/v1/progress`: Kiln renders elsewhere, so this process is always idle."""

    progress: float = 0.0
    eta_relative: float = 0.0
    state: dict[str, Any] = msgspec.field(default_factory=dict)
    current_image: str | None = None
    textinfo: str | None = None


class A1111Error(msgspec.Struct):
    """What A1111's API exception handler answers (`detail` is also what FastAPI clients read)."""

    error: str
    detail: Any
    body: str
    errors: str
