"""NanoGPT: its OpenAI-compatible images API, through the openai adapter's code.

Default base URL `https://nano-gpt.com/api`, so generation is
`POST https://nano-gpt.com/api/v1/images/generations` (`Authorization: Bearer <key>`); a base ending in
`/v1` is not doubled. Same body, answer and error shapes as OpenAI (see shared.providers.openai);
NanoGPT answers base64 by default.

Models are dynamic: `GET {base}/v1/images/models` (NanoGPT's image-model list, OpenAI-style
`{data: [{id, name?}]}`); a server without that route (404) is asked `GET {base}/v1/models` instead.
`test()` makes an authenticated call, `POST {base}/check-balance` (the model routes answer without a
key, so they would not prove it); a server without that route is tested by listing its models.
"""

from __future__ import annotations

import httpx

from shared.providers.base import (
    ModelInfo,
    OverrideRules,
    ParameterSpec,
    ProviderCapabilities,
    ProviderConnection,
)
from shared.providers.openai import OVERRIDE_RULES as OPENAI_OVERRIDE_RULES
from shared.providers.openai import PARAMETERS, OpenAIProvider, check_settings  # Azure-style api_version too

__all__ = ["CAPABILITIES", "DEFAULT_URL", "PARAMETERS", "NanoGPTProvider", "check_settings", "create"]

DEFAULT_URL = "https://nano-gpt.com/api"

# OpenAI's fields plus the diffusion knobs NanoGPT's models take; `nImages` multiplies the bill like `n`.
_STEPS = ParameterSpec("integer", min=1, max=150, description="Sampling steps (NanoGPT diffusion models).")
OVERRIDE_RULES = OverrideRules(
    keys=OPENAI_OVERRIDE_RULES.keys | {"nImages", "steps", "guidance_scale", "negative_prompt", "seed"},
    pinned={**OPENAI_OVERRIDE_RULES.pinned, "nImages": 1},
    bounds={**OPENAI_OVERRIDE_RULES.bounds, "steps": _STEPS},
)

CAPABILITIES = ProviderCapabilities(
    name="NanoGPT",
    parameters=PARAMETERS,
    api_key_required=True,
    model_list_style="dynamic",
    static_models=(),
    default_url=DEFAULT_URL,
    default_model="hidream",
    override_rules=OVERRIDE_RULES,
)


class NanoGPTProvider(OpenAIProvider):
    name: str = "nanogpt"
    vendor: str = "NanoGPT"
    capabilities: ProviderCapabilities = CAPABILITIES

    def headers(self) -> dict[str, str]:
        # NanoGPT takes either header; sending both keeps older and newer routes happy.
        key = self.connection.api_key
        return {"Authorization": f"Bearer {key}", "x-api-key": key} if key else {}

    def _root(self) -> str:
        base = self.base_url
        return base[: -len("/v1")] if base.endswith("/v1") else base

    async def list_models(self) -> list[ModelInfo]:
        response = await self.http.request("GET", self.api_url("images/models"), headers=self.headers())
        if response.status_code == 404:  # an OpenAI-compatible server without NanoGPT's image route
            response = await self.http.request("GET", self.api_url("models"), headers=self.headers())
        if not response.is_success:
            raise self.error_for(response)
        data = self.http.json_object(response).get("data")
        if not isinstance(data, list):
            raise self.http.invalid("the model list has no `data` array")
        models: dict[str, ModelInfo] = {}
        for item in data:
            if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"]:
                name = item.get("name")
                label = name if isinstance(name, str) and name else item["id"]
                models.setdefault(item["id"], ModelInfo(item["id"], label))
        return sorted(models.values(), key=lambda m: m.label.lower())

    async def test(self) -> None:
        response = await self.http.request("POST", f"{self._root()}/check-balance", headers=self.headers())
        if response.status_code in (404, 405):
            await super().test()
            return
        if not response.is_success:
            raise self.error_for(response)
        self.http.json_object(response)


def create(http: httpx.AsyncClient, connection: ProviderConnection) -> NanoGPTProvider:
    return NanoGPTProvider(http, connection)
