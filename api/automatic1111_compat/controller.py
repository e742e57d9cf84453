"""Automatic1111-compatible routes under `/sdapi/v1`, so tools built for A1111 (Open WebUI's automatic1111
engine, SillyTavern) use Kiln as their backend. The key is the Basic password (`user:<kiln key>`) or the
Bearer token; every error, the guard's included, answers in A1111's shape."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get, post
from litestar.params import JSONBody

from api.automatic1111_compat import service
from api.automatic1111_compat.schemas import (
    A1111Error,
    Progress,
    Sampler,
    SdModel,
    Txt2ImgRequest,
    Txt2ImgResponse,
)
from api.events.hub import status_hub_of
from api.openapi import API_KEY_SECURITY, AUTHENTICATED_ERRORS, error_responses
from api.parsing import JsonBody
from api.security.guards import (
    GenerationSpend,
    InjectedPrincipal,
    InjectedResources,
    StreamSlot,
    require_api_key,
)
from shared.providers import CAPABILITIES

AnyRequest = Request[Any, Any, Any]
_ERRORS = error_responses(403, 422, 502, 504, *AUTHENTICATED_ERRORS, container=A1111Error)
_READ_ERRORS = error_responses(403, 422, *AUTHENTICATED_ERRORS, container=A1111Error)


class Automatic1111Controller(Controller):
    path = "/sdapi/v1"
    guards = [require_api_key]  # the read budget; each image is charged as a generation
    security = API_KEY_SECURITY
    tags = ["automatic1111-compatible"]
    exception_handlers = {Exception: service.a1111_error}

    @post(
        "/txt2img",
        status_code=200,
        dto=JsonBody,
        return_dto=None,
        summary="Text to image (Automatic1111's API)",
        responses=_ERRORS,
        description="Creates batch_size x n_iter (at most 4) generations, all or none, each spending one "
        "unit of the generation budget; waits for them up to KILN_COMPAT_WAIT_SECONDS and answers "
        "their images in base64.",
    )
    async def txt2img(
        self,
        request: AnyRequest,
        data: JSONBody[Txt2ImgRequest],
        resources: InjectedResources,
        principal: InjectedPrincipal,
    ) -> Txt2ImgResponse:
        # Units of a refused request are given back; the long wait holds one of the key's stream
        # slots, as `Prefer: wait` does.
        async with GenerationSpend(request) as spend, StreamSlot(request):
            return await service.txt2img(resources, status_hub_of(request), principal, data, spend)

    @get("/sd-models", summary="The models (checkpoints) this key can use", responses=_READ_ERRORS)
    async def sd_models(self, resources: InjectedResources, principal: InjectedPrincipal) -> list[SdModel]:
        return await service.sd_models(resources, principal)

    @get("/options", summary="Options: the checkpoint txt2img uses for this key", responses=_READ_ERRORS)
    async def get_options(self, resources: InjectedResources, principal: InjectedPrincipal) -> dict[str, Any]:
        return await service.get_options(resources, principal)

    @post(
        "/options",
        status_code=200,
        summary="Choose the checkpoint (sd_model_checkpoint) for this key",
        responses=_READ_ERRORS,
    )
    async def set_options(
        self, data: dict[str, Any], resources: InjectedResources, principal: InjectedPrincipal
    ) -> None:
        await service.set_options(resources, principal, data)

    @get(
        "/samplers",
        summary="Samplers (the automatic1111 provider's are the GPU box's own)",
        responses=_READ_ERRORS,
    )
    async def samplers(self) -> list[Sampler]:
        options = CAPABILITIES["automatic1111"].parameters["samplerName"].options or ()
        return [Sampler(name=name, aliases=[], options={}) for name in options]

    @get(
        "/progress",
        summary="Progress of this server's current job: always idle (Kiln renders elsewhere)",
        responses=_READ_ERRORS,
    )
    async def progress(self) -> Progress:
        return Progress()
