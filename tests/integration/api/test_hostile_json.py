"""Deeply nested JSON in every free-form field answers 400 naming the field, never a 500 (issue 7 item 8).

10,000 levels is past msgspec's own limit (it raises RecursionError while decoding the body) and past
Python's (json.loads / json.dumps / the override merge would raise it later); 40 levels is past ours.
Nothing is written either way.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from shared.models import metadata
from tests.fakes.comfyui import EXAMPLE_NODES
from tests.integration.api.test_images_upload import UPLOAD, encode
from tests.integration.connections.helpers import create_connection, fields_of

DEEP = 10_000


def nested(levels: int) -> str:
    return '{"a": ' * levels + "1" + "}" * levels


async def rows(engine, table: str) -> int:
    async with engine.connect() as conn:
        query = select(func.count()).select_from(metadata.tables[table])
        return int((await conn.execute(query)).scalar_one())


def body(**fields: str) -> bytes:
    """A JSON object whose values are given as JSON text (so they can be nested past any encoder)."""
    return ("{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields.items()) + "}").encode()


GENERATION_CASES = [
    ("rawRequestOverride object", {"parameters": '{"rawRequestOverride": ' + nested(DEEP) + "}"}),
    ("rawRequestOverride JSON string", {"parameters": json.dumps({"rawRequestOverride": nested(DEEP)})}),
    ("rawRequestOverride object 40 deep", {"parameters": '{"rawRequestOverride": ' + nested(40) + "}"}),
    ("rawRequestOverride string 40 deep", {"parameters": json.dumps({"rawRequestOverride": nested(40)})}),
]


@pytest.mark.parametrize(("case", "fields"), GENERATION_CASES, ids=[c[0] for c in GENERATION_CASES])
async def test_a_deep_raw_request_override_answers_400_naming_it(client, tenant, engine, case, fields):
    # A project connection: the server default refuses any override before looking at it.
    conn = await create_connection(client, tenant.headers, provider="openai")
    raw = body(prompt='"x"', connectionId=json.dumps(conn["id"]), **fields)
    r = await client.post(
        "/api/v1/generations", content=raw, headers={**tenant.headers, "Content-Type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert "parameters.rawRequestOverride" in fields_of(r), r.text
    assert await rows(engine, "generations") == 0


@pytest.mark.parametrize("levels", [DEEP, 40])
async def test_a_deep_generation_meta_answers_400_naming_it(client, tenant, engine, levels):
    raw = body(prompt='"x"', meta='{"note": ' + nested(levels) + "}")
    r = await client.post(
        "/api/v1/generations", content=raw, headers={**tenant.headers, "Content-Type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert "meta.note" in fields_of(r)
    assert await rows(engine, "generations") == 0


WORKFLOW = {"6": {"inputs": {}}}
CONNECTION_CASES = [
    ("workflow object", '{"workflow": ' + nested(DEEP) + ', "nodes": []}', "metadata.workflow"),
    ("workflow string", json.dumps({"workflow": nested(DEEP), "nodes": EXAMPLE_NODES}), "metadata.workflow"),
    ("workflow string 40 deep", json.dumps({"workflow": nested(40), "nodes": []}), "metadata.workflow"),
    ("nodes string", json.dumps({"workflow": WORKFLOW, "nodes": "[" * DEEP + "]" * DEEP}), "metadata.nodes"),
    (
        "nodes string 40 deep",
        json.dumps({"workflow": WORKFLOW, "nodes": "[" * 40 + "]" * 40}),
        "metadata.nodes",
    ),
]


@pytest.mark.parametrize(
    ("case", "metadata_json", "field"), CONNECTION_CASES, ids=[c[0] for c in CONNECTION_CASES]
)
async def test_a_deep_connection_metadata_answers_400_naming_it(
    client, tenant, engine, case, metadata_json, field
):
    raw = body(name='"gpu"', provider='"comfyui"', metadata=metadata_json)
    r = await client.post(
        "/api/v1/connections", content=raw, headers={**tenant.headers, "Content-Type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert field in fields_of(r), r.text
    assert await rows(engine, "connections") == 0


async def test_a_deep_default_raw_request_override_answers_400_naming_it(client, tenant, engine):
    defaults = json.dumps({"rawRequestOverride": nested(DEEP)})
    raw = body(name='"o"', provider='"openai"', defaultParameters=defaults)
    r = await client.post(
        "/api/v1/connections", content=raw, headers={**tenant.headers, "Content-Type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert "defaultParameters.rawRequestOverride" in fields_of(r), r.text
    assert await rows(engine, "connections") == 0


async def test_a_deep_upload_meta_answers_400_naming_it(client, tenant, engine):
    r = await client.post(
        UPLOAD,
        files={"file": ("a.png", encode("PNG"), "image/png")},
        data={"meta": "[" * 5000 + "]" * 5000},
        headers=tenant.headers,
    )
    assert r.status_code == 400, r.text
    assert "meta" in fields_of(r)
    assert await rows(engine, "images") == 0


async def test_a_deep_batch_item_answers_400_naming_it(client, tenant, engine):
    item = '{"prompt": "x", "meta": ' + nested(DEEP) + "}"
    raw = ('{"items": [{"prompt": "fine"}, ' + item + "]}").encode()
    headers = {**tenant.headers, "Content-Type": "application/json"}
    r = await client.post("/api/v1/generations/batch", content=raw, headers=headers)
    assert r.status_code == 400, r.text
    assert "items[1].meta" in fields_of(r), r.text
    assert await rows(engine, "generations") == 0
