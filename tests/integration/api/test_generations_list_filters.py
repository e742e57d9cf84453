"""The list's dashboard filters: projectId (admins), provider, q (text in the prompt) and a time range,
with the keyset cursor and the list-page cache keyed on them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from api.generations import service
from tests.integration.api.conftest import insert_generation

LIST = "/api/v1/generations"
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def ids(r) -> list[str]:
    assert r.status_code == 200, r.text
    return [g["id"] for g in r.json()["data"]]


async def test_provider_prompt_text_and_time_range_filter_newest_first(client, tenant, engine):
    made = {}
    for minute, (prompt, provider) in enumerate(
        [
            ("A red Kiln", "placeholder"),
            ("blue sky", "openai"),
            ("kiln at 100%", "openai"),
            ("red_kiln", "gemini"),
        ]
    ):
        made[prompt] = str(
            await insert_generation(
                engine,
                tenant.project_id,
                prompt=prompt,
                provider=provider,
                created_at=T0 + timedelta(minutes=minute),
            )
        )
    h = tenant.headers
    assert ids(await client.get(LIST, params={"provider": "openai"}, headers=h)) == [
        made["kiln at 100%"],
        made["blue sky"],
    ]
    # Case-insensitive; LIKE's wildcards are the characters typed.
    assert ids(await client.get(LIST, params={"q": "KILN"}, headers=h)) == [
        made["red_kiln"],
        made["kiln at 100%"],
        made["A red Kiln"],
    ]
    assert ids(await client.get(LIST, params={"q": "100%"}, headers=h)) == [made["kiln at 100%"]]
    assert ids(await client.get(LIST, params={"q": "d_k"}, headers=h)) == [made["red_kiln"]]
    after, before = (T0 + timedelta(minutes=1)).isoformat(), (T0 + timedelta(minutes=3)).isoformat()
    r = await client.get(LIST, params={"createdAfter": after, "createdBefore": before}, headers=h)
    assert ids(r) == [made["kiln at 100%"], made["blue sky"]]
    r = await client.get(LIST, params={"createdAfter": after, "q": "kiln", "provider": "gemini"}, headers=h)
    assert ids(r) == [made["red_kiln"]]


async def test_the_cursor_pages_through_a_filtered_list(client, tenant, engine):
    made = [
        str(
            await insert_generation(
                engine, tenant.project_id, provider="openai", created_at=T0 + timedelta(seconds=i)
            )
        )
        for i in range(5)
    ]
    await insert_generation(
        engine, tenant.project_id, provider="gemini", created_at=T0 + timedelta(seconds=9)
    )
    seen, cursor = [], None
    while True:
        params = {"provider": "openai", "limit": 2, **({"cursor": cursor} if cursor else {})}
        r = await client.get(LIST, params=params, headers=tenant.headers)
        seen += ids(r)
        cursor = r.json()["pagination"]["nextCursor"]
        if not cursor:
            break
    assert seen == made[::-1]


async def test_a_prompt_search_reads_a_bounded_number_of_rows_per_page(client, tenant, engine, monkeypatch):
    monkeypatch.setattr(service, "SCAN_ROWS_PER_PAGE", 3)
    match_old = str(await insert_generation(engine, tenant.project_id, prompt="needle", created_at=T0))
    for i in range(4):  # newer rows without the text: more than a page reads
        await insert_generation(
            engine, tenant.project_id, prompt="hay", created_at=T0 + timedelta(seconds=1 + i)
        )
    r = await client.get(LIST, params={"q": "needle"}, headers=tenant.headers)
    assert ids(r) == []  # three rows read, none matched...
    page = r.json()["pagination"]
    assert page["hasMore"] and page["nextCursor"] and page["totalIsEstimate"]
    r = await client.get(LIST, params={"q": "needle", "cursor": page["nextCursor"]}, headers=tenant.headers)
    assert ids(r) == [match_old]  # ...and the next page goes on from the last row read
    assert not r.json()["pagination"]["hasMore"]


async def test_admins_name_a_project_and_project_keys_only_their_own(
    client, tenant, other_tenant, engine, admin_headers
):
    mine = str(await insert_generation(engine, tenant.project_id))
    theirs = str(await insert_generation(engine, other_tenant.project_id))
    assert set(ids(await client.get(LIST, headers=admin_headers))) >= {mine, theirs}
    r = await client.get(LIST, params={"projectId": str(other_tenant.project_id)}, headers=admin_headers)
    assert ids(r) == [theirs]
    assert ids(
        await client.get(LIST, params={"projectId": str(tenant.project_id)}, headers=tenant.headers)
    ) == [mine]
    r = await client.get(LIST, params={"projectId": str(other_tenant.project_id)}, headers=tenant.headers)
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"createdAfter": "yesterday"}, "createdAfter"),
        ({"createdAfter": "2026-01-01T00:00:00"}, "createdAfter"),  # no time zone
        ({"createdAfter": "2026-01-02T00:00:00Z", "createdBefore": "2026-01-01T00:00:00Z"}, "createdBefore"),
        ({"q": "x" * 201}, "q"),
        ({"q": "a\x00b"}, "q"),
        ({"q": "kiln", "offset": 5}, "offset"),
        ({"provider": "p" * 65}, "provider"),
        ({"projectId": "not-a-uuid"}, "projectId"),
    ],
)
async def test_bad_filters_are_400_naming_the_field(client, tenant, params, field):
    r = await client.get(LIST, params=params, headers=tenant.headers)
    assert r.status_code == 400, r.text
    assert field in r.text


async def test_the_list_page_cache_keeps_filtered_pages_apart(client, tenant, engine):
    await insert_generation(engine, tenant.project_id, status="success", provider="openai", prompt="one")
    await insert_generation(engine, tenant.project_id, status="success", provider="gemini", prompt="two")
    h = tenant.headers
    a = await client.get(LIST, params={"status": "success", "provider": "openai"}, headers=h)
    b = await client.get(LIST, params={"status": "success", "provider": "gemini"}, headers=h)
    c = await client.get(LIST, params={"status": "success", "q": "two"}, headers=h)
    assert [g["prompt"] for g in a.json()["data"]] == ["one"]
    assert [g["prompt"] for g in b.json()["data"]] == ["two"]
    assert [g["prompt"] for g in c.json()["data"]] == ["two"]


async def test_a_provider_filter_reads_a_bounded_number_of_rows_per_page(client, tenant, engine, monkeypatch):
    monkeypatch.setattr(service, "SCAN_ROWS_PER_PAGE", 2)
    rare = str(await insert_generation(engine, tenant.project_id, provider="gemini", created_at=T0))
    for i in range(3):
        await insert_generation(engine, tenant.project_id, created_at=T0 + timedelta(seconds=1 + i))
    seen, cursor, pages = [], None, 0
    while True:
        params = {"provider": "gemini", **({"cursor": cursor} if cursor else {})}
        r = await client.get(LIST, params=params, headers=tenant.headers)
        seen += ids(r)
        pages += 1
        cursor = r.json()["pagination"]["nextCursor"]
        if not cursor:
            break
    # Two rows read per page: the second reaches the oldest row; a page that read all it may is never
    # sure it was the last, so a third (empty) one ends the listing.
    assert seen == [rare] and pages == 3
