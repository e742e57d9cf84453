"""Shared bits of the connection tests."""

from __future__ import annotations

from typing import Any

from tests.fakes.comfyui import EXAMPLE_NODES, EXAMPLE_WORKFLOW

SECRET = "sk-test-" + "s3cr3t" * 6  # distinctive, so a leak anywhere is easy to find

COMFY_METADATA: dict[str, Any] = {"workflow": EXAMPLE_WORKFLOW, "nodes": EXAMPLE_NODES}


async def create_connection(client: Any, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    body.setdefault("name", "my connection")
    body.setdefault("provider", "openai")
    r = await client.post("/api/v1/connections", json=body, headers=headers)
    assert r.status_code == 201, r.text
    data: dict[str, Any] = r.json()["data"]
    return data


def fields_of(response: Any) -> dict[str, str]:
    """The error envelope's details as {field: message}."""
    body = response.json()
    assert body["success"] is False and body["error"]["code"] == "VALIDATION_ERROR", body
    return {d["field"]: d["message"] for d in body["error"]["details"]}
