"""Automatic1111's web API on Kiln: a txt2img becomes `batch_size x n_iter` generations created together
(all or none, one generation-budget unit each), waited for, and answered with their images in base64.

What maps to what:
- `width` x `height` -> the nearest Kiln aspect ratio; providers with width/height parameters (the
  placeholder, ComfyUI) also get the exact size.
- `steps`, `cfg_scale`, `sampler_name` (or the older `sampler_index`), `scheduler`, `restore_faces`,
  `tiling`, `enable_hr` (+ `hr_scale`, `hr_upscaler`, `denoising_strength`): the target provider's
  parameters where its schema has them (the automatic1111 provider has them all).
- `seed`: -1 lets each generation pick; otherwise image i gets seed + i, as A1111 does.
- The checkpoint: `override_settings.sd_model_checkpoint`, else the one this key chose with
  `POST /sdapi/v1/options`, else the project's default target; any name `sd-models` lists.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import msgspec
from litestar import Request, Response

from api.automatic1111_compat.schemas import A1111Error, SdModel, Txt2ImgRequest, Txt2ImgResponse
from api.connections.service import UsableModel, target_of_model, usable_models
from api.errors import foreign_error
from api.events.hub import StatusHub
from api.generations.rules import validate_create
from api.generations.schemas import MODEL_MAX_LENGTH, SEED_MAX, CreateGenerationRequest
from api.generations.service import GenerationBudget, create_group_and_wait, require_success
from api.images.service import output_bytes
from api.resources import Resources
from api.security.auth import Principal
from api.security.guards import project_id_of
from shared.errors import ValidationFailed
from shared.models import new_id, utcnow
from shared.providers import CAPABILITIES
from shared.sizes import nearest_aspect_ratio

# The checkpoint a key chose (POST /sdapi/v1/options), kept as long as a tool's settings would be.
CHECKPOINT_TTL_SECONDS = 30 * 24 * 3600


def _checkpoint_key(principal: Principal) -> str:
    return f"kiln:a1111:checkpoint:{principal.key_id}"


def _sd_model(model: UsableModel) -> SdModel:
    return SdModel(title=model.id, model_name=model.id, hash=None, sha256=None, filename=model.id)


async def sd_models(resources: Resources, principal: Principal) -> list[SdModel]:
    project_id = project_id_of(principal, "list models")
    return [_sd_model(m) for m in await usable_models(resources, project_id)]


async def _chosen(resources: Resources, principal: Principal) -> str | None:
    chosen = await resources.redis.get(_checkpoint_key(principal))
    return chosen.decode() if isinstance(chosen, bytes) else chosen


async def get_options(resources: Resources, principal: Principal) -> dict[str, Any]:
    """The options tools read: the checkpoint (the key's choice, else the default target's name)."""
    project_id = project_id_of(principal, "read options")
    checkpoint = await _chosen(resources, principal)
    if checkpoint is None:
        checkpoint = (await target_of_model(resources, project_id, None)).id
    return {"sd_model_checkpoint": checkpoint, "sd_checkpoint_hash": None, "samples_format": "png"}


async def set_options(resources: Resources, principal: Principal, options: dict[str, Any]) -> None:
    """Remembers `sd_model_checkpoint` for this key (it must name a usable model); other options are
    the A1111 server's own and mean nothing here: they are ignored."""
    project_id = project_id_of(principal, "set options")
    checkpoint = options.get("sd_model_checkpoint")
    if checkpoint is None:
        return
    if not isinstance(checkpoint, str) or not 0 < len(checkpoint) <= MODEL_MAX_LENGTH:
        raise ValidationFailed.field(
            "sd_model_checkpoint", f"must be a model name of 1 to {MODEL_MAX_LENGTH} characters"
        )
    target = await target_of_model(resources, project_id, checkpoint)  # 400 for an unknown one
    await resources.redis.set(_checkpoint_key(principal), target.id, ex=CHECKPOINT_TTL_SECONDS)


def _parameters(request: Txt2ImgRequest, provider: str) -> dict[str, Any]:
    given: dict[str, Any] = {
        "steps": request.steps,
        "cfgScale": request.cfg_scale,
        "samplerName": request.sampler_name or request.sampler_index,
        "scheduler": request.scheduler,
        "restoreFaces": request.restore_faces,
        "tiling": request.tiling,
        "width": request.width,
        "height": request.height,
    }
    if request.enable_hr:
        given |= {
            "enableHr": True,
            "hrScale": request.hr_scale,
            "hrUpscaler": request.hr_upscaler,
            "denoisingStrength": request.denoising_strength,
        }
    schema = CAPABILITIES[provider].parameters
    return {name: value for name, value in given.items() if value is not None and name in schema}


async def txt2img(
    resources: Resources,
    hub: StatusHub,
    principal: Principal,
    request: Txt2ImgRequest,
    budget: GenerationBudget,
) -> Txt2ImgResponse:
    project_id = project_id_of(principal, "create generations")
    count = request.batch_size * request.n_iter
    if count > 4:
        raise ValidationFailed.field("batch_size", "batch_size x n_iter must be at most 4")
    checkpoint = (request.override_settings or {}).get("sd_model_checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise ValidationFailed.field("override_settings.sd_model_checkpoint", "must be a model name")
    target = await target_of_model(resources, project_id, checkpoint or await _chosen(resources, principal))
    parameters = _parameters(request, target.provider)
    seeds = (
        [None] * count if request.seed == -1 else [(request.seed + i) % (SEED_MAX + 1) for i in range(count)]
    )
    group = str(new_id())
    valid = [
        validate_create(
            CreateGenerationRequest(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt or None,
                aspect_ratio=nearest_aspect_ratio(request.width, request.height),
                auto_enhance=False,  # the tool sent its prompt as meant
                meta={"automatic1111": {"group": group}},
                model=target.model,
                connection_id=str(target.connection_id) if target.connection_id else None,
                parameters=parameters or None,
                seed=seed,
            ),
            resources.settings,
        )
        for seed in seeds
    ]
    wait = resources.settings.compat.wait_seconds
    records = await create_group_and_wait(
        resources, hub, project_id, principal.max_in_flight, valid, budget, wait
    )
    require_success(records, wait)
    images = await asyncio.gather(*(output_bytes(resources, principal, record) for record in records))
    echoed = msgspec.structs.asdict(request)
    info = {
        "prompt": request.prompt,
        "all_prompts": [r.prompt for r in records],
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * count,
        "seed": records[0].seed,
        "all_seeds": [r.seed for r in records],
        "width": request.width,
        "height": request.height,
        "sampler_name": request.sampler_name or request.sampler_index,
        "cfg_scale": request.cfg_scale,
        "steps": request.steps,
        "batch_size": request.batch_size,
        "sd_model_name": target.id,
        "job_timestamp": utcnow().strftime("%Y%m%d%H%M%S"),
        "infotexts": [r.prompt for r in records],
        "kiln_generation_ids": [r.id for r in records],
    }
    return Txt2ImgResponse(
        images=[base64.b64encode(image).decode() for image in images],
        parameters=echoed,
        info=json.dumps(info),
    )


def _a1111_shape(status: int, error: dict[str, Any]) -> tuple[int, A1111Error, dict[str, str]]:
    details = error.get("details") or []
    body = A1111Error(
        error=error["code"],
        detail=error["message"],
        body="",
        errors="; ".join(f"{d['field']}: {d['message']}" for d in details) or error["message"],
    )
    return (422 if status == 400 else status), body, {}  # invalid input: 422, as A1111 (FastAPI) answers


def a1111_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Every error in A1111's `{error, detail, body, errors}` shape."""
    return foreign_error(request, exc, _a1111_shape)
