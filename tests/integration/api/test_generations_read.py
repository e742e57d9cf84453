"""GET one generation (with its output image) and the list: filters, offset and cursor pages."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from api.generations import repository
from api.generations.service import TOTAL_EXACT_UP_TO
from api.pagination import encode_cursor
from tests.integration.api.conftest import (
    BASE_URL,
    api_client,
    generations,
    insert_finished_generation,
    insert_generation,
)

LIST = "/api/v1/generations"


async def test_a_successful_generation_carries_its_output_image(client, tenant, engine, storage):
    generation_id, image = await insert_finished_generation(engine, storage, tenant.project_id)
    r = await client.get(f"{LIST}/{generation_id}", headers=tenant.headers)
    assert r.status_code == 200
    data = r.json()["data"]
    assert data["status"] == "success"
    assert data["outputImageId"] == str(image["id"])
    assert data["processingTimeMs"] == 1234
    public = f"{BASE_URL}/i/{image['public_token']}"
    assert data["outputImage"] == {
        "id": str(image["id"]),
        "storageUrl": f"{BASE_URL}/api/v1/images/{image['id']}/content",
        "publicUrl": public,
        "mimeType": "image/png",
        "width": 64,
        "height": 48,
        "fileSize": image["file_size"],
        "thumbnails": {"sm": f"{public}?size=sm", "lg": f"{public}?size=lg"},
    }
    # The storageUrl works with the same key.
    content = await client.get(data["outputImage"]["storageUrl"], headers=tenant.headers)
    assert content.status_code == 200 and content.content == b"\x89PNG original bytes"


async def test_storage_url_is_the_direct_url_when_storage_has_one(api_settings, tenant, engine, storage):
    generation_id, image = await insert_finished_generation(engine, storage, tenant.project_id)
    cdn = api_settings.model_copy(
        update={"storage": api_settings.storage.model_copy(update={"public_base_url": "https://cdn.example"})}
    )
    async with api_client(cdn) as client:
        r = await client.get(f"{LIST}/{generation_id}", headers=tenant.headers)
    assert r.json()["data"]["outputImage"]["storageUrl"] == f"https://cdn.example/{image['storage_key']}"


async def test_unfinished_and_failed_generations_have_no_output_image(client, tenant, engine):
    failed = await insert_generation(
        engine,
        tenant.project_id,
        status="failed",
        error_code="PROVIDER_ERROR",
        error_message="boom",
        retry_count=2,
    )
    data = (await client.get(f"{LIST}/{failed}", headers=tenant.headers)).json()["data"]
    assert data["outputImage"] is None and data["outputImageId"] is None
    assert (data["status"], data["errorCode"], data["errorMessage"], data["retryCount"]) == (
        "failed",
        "PROVIDER_ERROR",
        "boom",
        2,
    )


async def _seed(engine, project_id, statuses: list[str], *, tie_every: int = 0) -> list[uuid.UUID]:
    """Rows with distinct creation times (some sharing one, to exercise the id tie-break); newest last."""
    base = datetime(2025, 11, 28, 10, 0, tzinfo=UTC)
    ids = []
    for i, status in enumerate(statuses):
        slot = i // tie_every if tie_every else i
        ids.append(
            await insert_generation(
                engine, project_id, status=status, created_at=base + timedelta(seconds=slot)
            )
        )
    return ids


def _expected_order(engine_rows: list[tuple[datetime, uuid.UUID]]) -> list[str]:
    return [str(i) for _, i in sorted(engine_rows, key=lambda r: (r[0], r[1]), reverse=True)]


async def _all_rows(engine, project_id, statuses=None, include_deleted=False) -> list[str]:
    clauses = ["project_id = :p"]
    if statuses:
        clauses.append("status = ANY(:s)")
    if not include_deleted:
        clauses.append("deleted_at IS NULL")
    sql = f"SELECT created_at, id FROM generations WHERE {' AND '.join(clauses)}"
    async with engine.connect() as conn:
        rows = (await conn.execute(text(sql), {"p": project_id, "s": statuses})).all()
    return _expected_order([(r.created_at, r.id) for r in rows])


async def test_list_is_newest_first_with_pagination_defaults(client, tenant, engine):
    await _seed(engine, tenant.project_id, ["pending"] * 25)
    r = await client.get(LIST, headers=tenant.headers)
    body = r.json()
    assert r.status_code == 200 and body["success"] is True
    assert [g["id"] for g in body["data"]] == (await _all_rows(engine, tenant.project_id))[:20]
    pagination = body["pagination"]
    assert pagination["limit"] == 20 and pagination["offset"] == 0
    assert pagination["total"] == 25 and pagination["hasMore"] is True
    assert pagination["totalIsEstimate"] is False and pagination["nextCursor"]


@pytest.mark.parametrize(
    ("query", "statuses"),
    [
        ("status=success", ["success"]),
        ("status=failed", ["failed"]),
        ("status=pending,processing", ["pending", "processing"]),
        ("status=success, failed ,cancelled", ["success", "failed", "cancelled"]),
        ("status=pending&status=success", ["pending", "success"]),  # repeated values add up
    ],
)
async def test_status_filters(client, tenant, engine, query, statuses):
    mix = ["pending", "processing", "success", "failed", "cancelled"] * 3
    await _seed(engine, tenant.project_id, mix)
    r = await client.get(f"{LIST}?{query}&limit=100", headers=tenant.headers)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert {g["status"] for g in data} == set(statuses)
    assert [g["id"] for g in data] == await _all_rows(engine, tenant.project_id, statuses)
    assert r.json()["pagination"]["total"] == 3 * len(statuses)


async def test_offset_pages(client, tenant, engine):
    await _seed(engine, tenant.project_id, ["success"] * 7 + ["failed"] * 3)
    expected = await _all_rows(engine, tenant.project_id)
    seen = []
    for offset, has_more in ((0, True), (4, True), (8, False)):
        r = await client.get(f"{LIST}?limit=4&offset={offset}", headers=tenant.headers)
        pagination = r.json()["pagination"]
        assert (pagination["limit"], pagination["offset"], pagination["total"]) == (4, offset, 10)
        assert pagination["hasMore"] is has_more
        assert (pagination["nextCursor"] is not None) is has_more
        seen += [g["id"] for g in r.json()["data"]]
    assert seen == expected
    beyond = await client.get(f"{LIST}?limit=4&offset=50", headers=tenant.headers)
    assert beyond.json()["data"] == [] and beyond.json()["pagination"]["hasMore"] is False


@pytest.mark.parametrize("status_query", ["", "&status=success,failed"])
async def test_cursor_pages_cover_every_row_exactly_once_in_order(
    client, tenant, other_tenant, engine, status_query
):
    # 53 rows, creation times shared by threes: the id must break ties consistently.
    await _seed(
        engine, tenant.project_id, ["success", "failed", "pending"] * 17 + ["success", "failed"], tie_every=3
    )
    await _seed(engine, other_tenant.project_id, ["success"] * 5)  # never leaks in
    statuses = ["success", "failed"] if status_query else None
    expected = await _all_rows(engine, tenant.project_id, statuses)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        url = f"{LIST}?limit=7{status_query}" + (f"&cursor={cursor}" if cursor else "")
        r = await client.get(url, headers=tenant.headers)
        assert r.status_code == 200, r.text
        body = r.json()
        seen += [g["id"] for g in body["data"]]
        pages += 1
        cursor = body["pagination"]["nextCursor"]
        assert body["pagination"]["total"] == len(expected)
        if not body["pagination"]["hasMore"]:
            assert cursor is None
            break
        assert len(body["data"]) == 7
    assert seen == expected
    assert pages == -(-len(expected) // 7)


async def test_deleted_generations_are_hidden_unless_asked_for(client, tenant, engine):
    kept = await insert_generation(engine, tenant.project_id, status="success")
    hidden = await insert_generation(
        engine, tenant.project_id, status="success", deleted_at=datetime.now(UTC)
    )
    default = await client.get(LIST, headers=tenant.headers)
    assert [g["id"] for g in default.json()["data"]] == [str(kept)]
    assert default.json()["pagination"]["total"] == 1
    explicit_false = await client.get(f"{LIST}?includeDeleted=false", headers=tenant.headers)
    assert [g["id"] for g in explicit_false.json()["data"]] == [str(kept)]
    included = await client.get(f"{LIST}?includeDeleted=true", headers=tenant.headers)
    assert {g["id"] for g in included.json()["data"]} == {str(kept), str(hidden)}
    assert included.json()["pagination"]["total"] == 2
    # The record itself stays readable by id.
    assert (await client.get(f"{LIST}/{hidden}", headers=tenant.headers)).status_code == 200


async def _insert_many(engine, project_id, count: int) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO generations (id, project_id, prompt, original_prompt, auto_enhance, "
                "aspect_ratio, status, provider, retry_count, attempts, version, deadline_at) "
                "SELECT gen_random_uuid(), :p, 'p', 'p', false, '1:1', 'success', 'placeholder', 0, 0, 1, "
                "now() + interval '1 hour' FROM generate_series(1, :n)"
            ),
            {"p": project_id, "n": count},
        )


async def test_total_is_counted_up_to_the_cap_then_estimated_by_the_planner(client, tenant, engine):
    await _insert_many(engine, tenant.project_id, 1_500)
    # Before ANALYZE the statistics know nothing of these rows: the planner's estimate is small, so the
    # rows are counted, up to the cap.
    r = await client.get(f"{LIST}?limit=100&status=success", headers=tenant.headers)
    pagination = r.json()["pagination"]
    assert pagination["total"] == TOTAL_EXACT_UP_TO and pagination["totalIsEstimate"] is True
    assert pagination["hasMore"] is True and len(r.json()["data"]) == 100
    async with engine.begin() as conn:
        await conn.execute(text("ANALYZE generations"))
    # With statistics, a large total is the planner's estimate: no row is counted. (Another page size:
    # the first page's answer is kept until the project's next status event, and these rows were
    # written straight into the table, without one.)
    r = await client.get(f"{LIST}?limit=99&status=success", headers=tenant.headers)
    pagination = r.json()["pagination"]
    assert pagination["totalIsEstimate"] is True
    assert 1_000 < pagination["total"] < 3_000
    exact = await client.get(f"{LIST}?status=pending", headers=tenant.headers)
    assert exact.json()["pagination"]["total"] == 0 and exact.json()["pagination"]["totalIsEstimate"] is False


async def test_a_large_estimate_is_reused_for_a_few_seconds(client, tenant, engine, monkeypatch):
    await _insert_many(engine, tenant.project_id, 1_200)
    async with engine.begin() as conn:
        await conn.execute(text("ANALYZE generations"))
    asked = []
    estimate = repository.estimate_generations

    async def counted(*args, **kwargs):
        asked.append(1)
        return await estimate(*args, **kwargs)

    monkeypatch.setattr(repository, "estimate_generations", counted)
    totals = [
        (await client.get(f"{LIST}?status=success", headers=tenant.headers)).json()["pagination"]["total"]
        for _ in range(3)
    ]
    assert len(asked) == 1 and len(set(totals)) == 1 and totals[0] > 1_000
    other_filter = await client.get(f"{LIST}?status=success,failed", headers=tenant.headers)
    assert other_filter.status_code == 200 and len(asked) == 2


async def test_a_small_total_is_exact(client, tenant, engine):
    await _seed(engine, tenant.project_id, ["success"] * 30)
    pagination = (await client.get(f"{LIST}?limit=7", headers=tenant.headers)).json()["pagination"]
    assert (pagination["total"], pagination["totalIsEstimate"]) == (30, False)


@pytest.fixture
def forbid_counting(monkeypatch):
    """Call it: from then on, counting or estimating a list's total fails the request."""

    async def refuse(*args, **kwargs):
        raise AssertionError("the total was counted")

    def forbid() -> None:
        monkeypatch.setattr(repository, "count_generations", refuse)
        monkeypatch.setattr(repository, "estimate_generations", refuse)

    return forbid


async def test_cursor_pages_carry_the_first_pages_total_without_counting(
    client, tenant, engine, forbid_counting
):
    ids = await _seed(engine, tenant.project_id, ["success"] * 10)
    first = (await client.get(f"{LIST}?limit=4", headers=tenant.headers)).json()["pagination"]
    assert (first["total"], first["totalIsEstimate"]) == (10, False)
    async with engine.begin() as conn:  # gone since the first page: a cursor page does not count again
        await conn.execute(generations.delete().where(generations.c.id == ids[0]))
    forbid_counting()
    second = await client.get(f"{LIST}?limit=4&cursor={first['nextCursor']}", headers=tenant.headers)
    assert second.status_code == 200, second.text
    pagination = second.json()["pagination"]
    assert (pagination["total"], pagination["totalIsEstimate"], pagination["hasMore"]) == (10, False, True)
    third = await client.get(f"{LIST}?limit=4&cursor={pagination['nextCursor']}", headers=tenant.headers)
    assert third.json()["pagination"]["total"] == 10 and len(third.json()["data"]) == 1


async def test_a_page_that_reaches_the_end_knows_its_total_without_counting(
    client, tenant, engine, forbid_counting
):
    await _seed(engine, tenant.project_id, ["success"] * 5 + ["failed"] * 2)
    forbid_counting()
    for query, total in (("", 7), ("?status=success", 5), ("?limit=3&offset=5", 7)):
        pagination = (await client.get(f"{LIST}{query}", headers=tenant.headers)).json()["pagination"]
        assert (pagination["total"], pagination["totalIsEstimate"], pagination["hasMore"]) == (
            total,
            False,
            False,
        )


async def test_a_cursor_without_a_total_still_pages(client, tenant, engine):
    await _seed(engine, tenant.project_id, ["success"] * 6)
    rows = await _all_rows(engine, tenant.project_id)
    async with engine.connect() as conn:
        created_at = (
            await conn.execute(text("SELECT created_at FROM generations WHERE id = :i"), {"i": rows[1]})
        ).scalar_one()
    cursor = encode_cursor(created_at, uuid.UUID(rows[1]))  # as cursors were made before totals were carried
    r = await client.get(f"{LIST}?limit=2&cursor={cursor}", headers=tenant.headers)
    assert [g["id"] for g in r.json()["data"]] == rows[2:4]
    assert r.json()["pagination"]["total"] == 6 and r.json()["pagination"]["totalIsEstimate"] is False


async def test_a_listed_record_is_the_record_read_by_id(client, tenant, engine, storage):
    """The list renders its rows like GET by id (output image, queue position, times)."""
    finished, _ = await insert_finished_generation(engine, storage, tenant.project_id)
    failed = await insert_generation(engine, tenant.project_id, status="failed", error_code="PROVIDER_ERROR")
    pending = await insert_generation(engine, tenant.project_id, status="pending")
    listed = {g["id"]: g for g in (await client.get(LIST, headers=tenant.headers)).json()["data"]}
    for generation_id in (finished, failed, pending):
        by_id = (await client.get(f"{LIST}/{generation_id}", headers=tenant.headers)).json()["data"]
        assert listed[str(generation_id)] == by_id
    assert listed[str(finished)]["outputImage"]["thumbnails"]["sm"].endswith("?size=sm")
    assert listed[str(pending)]["queuePosition"] >= 1


async def test_list_limit_bounds(client, tenant, engine):
    await _seed(engine, tenant.project_id, ["pending"] * 3)
    for limit in (1, 100):
        r = await client.get(f"{LIST}?limit={limit}", headers=tenant.headers)
        assert r.status_code == 200 and len(r.json()["data"]) == min(limit, 3)


def test_generations_table_is_the_one_listed():
    assert generations.name == "generations"


def test_list_statements_take_only_known_statuses():
    # Statuses are written into the statement's SQL (so PostgreSQL keeps one plan per statement).
    with pytest.raises(ValueError, match="unknown status"):
        repository._shape(repository.ListFilter(None, ("success", "x') OR true --"), False))


async def test_an_admin_keys_list_reads_an_index_in_list_order(engine):
    """Across every project the list walks an index newest first instead of sorting the whole table."""
    shape = repository._shape(repository.ListFilter(None, (), False))._replace(limit=21)
    async with engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        async with driver.transaction():
            await driver.execute("SET LOCAL enable_sort = off")  # a small test table: sorting looks cheap
            plan = "\n".join(
                row[0] for row in await driver.fetch(f"EXPLAIN {repository._list_page(shape).sql}")
            )
    assert "Sort" not in plan and "ix_generations_created" in plan
