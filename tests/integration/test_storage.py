"""One behaviour suite, run against the local directory and a real S3 endpoint (moto over HTTP)."""

import asyncio
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest

from shared.settings import Settings, StorageSettings
from shared.storage import LocalStorage, ObjectMissing, ObjectStorage, S3Storage, create_storage

PUBLIC = "https://cdn.example.com/media/"


def s3_storage(endpoint: str, bucket: str, public_base_url: str | None = None) -> S3Storage:
    return S3Storage(
        bucket=bucket,
        endpoint_url=endpoint,
        region="us-east-1",
        access_key_id="test",
        secret_access_key="test",
        public_base_url=public_base_url,
    )


@pytest.fixture(params=["local", "s3"])
async def storage(request, tmp_path: Path):
    if request.param == "local":
        yield LocalStorage(tmp_path / "objects", public_base_url=PUBLIC)
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        store = s3_storage(endpoint, f"kiln-test-{uuid.uuid4().hex[:12]}", PUBLIC)
        await store.ensure_bucket()
        yield store
        await store.close()


async def test_put_get_round_trip(storage: ObjectStorage):
    data = bytes(range(256)) * 100
    await storage.put("projects/p1/images/a.png", data, "image/png")
    assert await storage.get("projects/p1/images/a.png") == data
    assert await storage.exists("projects/p1/images/a.png")


async def test_put_overwrites(storage: ObjectStorage):
    await storage.put("k/one.bin", b"first", "application/octet-stream")
    await storage.put("k/one.bin", b"second", "application/octet-stream")
    assert await storage.get("k/one.bin") == b"second"


async def test_empty_object(storage: ObjectStorage):
    await storage.put("empty.txt", b"", "text/plain")
    assert await storage.get("empty.txt") == b""
    assert await storage.exists("empty.txt")


async def test_missing_object(storage: ObjectStorage):
    with pytest.raises(ObjectMissing):
        await storage.get("nope/missing.png")
    with pytest.raises(KeyError):  # ObjectMissing is a KeyError for callers that catch that
        await storage.get("missing.png")
    assert not await storage.exists("nope/missing.png")


async def test_directory_like_prefix_is_not_an_object(storage: ObjectStorage):
    await storage.put("dir/inside.png", b"x", "image/png")
    assert not await storage.exists("dir")
    with pytest.raises(ObjectMissing):
        await storage.get("dir")


async def test_delete_some_keys_and_ignore_missing_ones(storage: ObjectStorage):
    for name in ("a", "b", "c"):
        await storage.put(f"del/{name}.png", name.encode(), "image/png")
    await storage.delete(["del/a.png", "del/c.png", "del/never-there.png"])
    assert await storage.list_keys("del/") == ["del/b.png"]
    await storage.delete([])
    await storage.delete(["del/a.png"])  # already gone: fine
    with pytest.raises(ObjectMissing):
        await storage.get("del/a.png")


async def test_list_keys_by_prefix_sorted(storage: ObjectStorage):
    keys = [
        "p/g1/v1/original.png",
        "p/g1/v1/sm.webp",
        "p/g1/v2/original.png",
        "p/g10/original.png",
        "q/x.png",
    ]
    for key in reversed(keys):
        await storage.put(key, b"x", "image/png")
    assert await storage.list_keys("p/g1/") == keys[:3]
    assert await storage.list_keys("p/g1") == keys[:4]  # a plain string prefix, like S3
    assert await storage.list_keys("p/g1/v1/sm") == ["p/g1/v1/sm.webp"]
    assert await storage.list_keys("") == keys
    assert await storage.list_keys("zzz/") == []


async def test_list_objects_pages_in_key_order_with_modification_times(storage: ObjectStorage):
    keys = [f"pages/{i:04d}/original.png" for i in range(7)]
    before = datetime.now(UTC) - timedelta(seconds=2)  # S3 keeps whole seconds
    for key in reversed(keys):
        await storage.put(key, b"x", "image/png")
    await storage.put("pagesx/other.png", b"x", "image/png")
    after = datetime.now(UTC) + timedelta(seconds=2)

    first = await storage.list_objects("pages/", limit=3)
    assert [o.key for o in first] == keys[:3]
    rest = await storage.list_objects("pages/", start_after=first[-1].key, limit=10)
    assert [o.key for o in rest] == keys[3:]
    assert await storage.list_objects("pages/", start_after=keys[-1], limit=10) == []
    for found in (*first, *rest):
        assert found.last_modified.tzinfo is not None and before <= found.last_modified <= after


async def test_list_objects_pages_through_every_key_in_list_keys_order_from_any_cursor(
    storage: ObjectStorage,
):
    # Names around '/': '-' and '.' sort before it, '0' after, so a naive directory walk would differ.
    keys = ["t/a-b/x", "t/a.b", "t/a/b/c", "t/a/x", "t/a0/x", "t/ab", "t/b", "tz/outside"]
    for key in keys:
        await storage.put(key, b"x", "image/png")
    everything = await storage.list_keys("t/")
    assert everything == sorted(k for k in keys if k.startswith("t/"))
    for cursor in ["", *everything, "t/a", "t/a/", "t/a/b", "t/a0"]:
        expected = [k for k in everything if k > cursor]
        assert [o.key for o in await storage.list_objects("t/", start_after=cursor, limit=100)] == expected
        paged: list[str] = []
        while page := await storage.list_objects("t/", start_after=paged[-1] if paged else cursor, limit=2):
            paged.extend(o.key for o in page)
        assert paged == expected, cursor
    assert [o.key for o in await storage.list_objects("t/a", limit=100)] == everything[:-1]  # not t/b


async def test_a_cancelled_put_returns_only_once_its_write_has_landed(storage: ObjectStorage):
    # The write runs in a thread, which a cancel cannot stop: a caller that went on at once would delete
    # the prefix and then see the object land (an orphan). Hold the write until the cancel is delivered.
    gate, entered = threading.Event(), threading.Event()
    write = storage._put  # type: ignore[attr-defined]

    def gated_write(*args: object) -> None:
        entered.set()
        assert gate.wait(30)
        write(*args)

    storage._put = gated_write  # type: ignore[attr-defined]
    put = asyncio.create_task(storage.put("gated/original.png", b"bytes", "image/png"))
    assert await asyncio.to_thread(entered.wait, 30)
    put.cancel()
    await asyncio.sleep(0.05)  # many loop turns: a put that does not wait for its thread is done by now
    done_before_the_write = put.done()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await put
    assert not done_before_the_write
    assert await storage.list_keys("gated/") == ["gated/original.png"]  # landed before put returned


async def test_delete_prefix(storage: ObjectStorage):
    for i in range(5):
        await storage.put(f"gen/1/file{i}.png", b"x", "image/png")
    await storage.put("gen/10/keep.png", b"x", "image/png")
    await storage.put("gen/2/keep.png", b"x", "image/png")
    assert await storage.delete_prefix("gen/1/") == 5
    assert await storage.list_keys("gen/") == ["gen/10/keep.png", "gen/2/keep.png"]
    assert await storage.delete_prefix("gen/1/") == 0
    assert await storage.delete_prefix("nothing/") == 0


async def test_delete_prefix_beyond_one_batch(storage: ObjectStorage):
    # More than one S3 listing page / DeleteObjects batch (1000).
    keys = [f"many/{i:05d}.txt" for i in range(1105)]
    sem = asyncio.Semaphore(16)

    async def put(key: str) -> None:
        async with sem:
            await storage.put(key, b"1", "text/plain")

    await asyncio.gather(*(put(k) for k in keys))
    assert await storage.list_keys("many/") == keys
    assert await storage.delete_prefix("many/") == 1105
    assert await storage.list_keys("many/") == []


async def test_delete_more_keys_than_one_batch(storage: ObjectStorage):
    keys = [f"batch/{i:05d}.txt" for i in range(1003)]
    sem = asyncio.Semaphore(16)

    async def put(key: str) -> None:
        async with sem:
            await storage.put(key, b"1", "text/plain")

    await asyncio.gather(*(put(k) for k in keys))
    await storage.put("batch/keep.txt", b"1", "text/plain")
    await storage.delete(keys)
    assert await storage.list_keys("batch/") == ["batch/keep.txt"]


async def test_concurrent_writes_of_one_key_leave_a_whole_object(storage: ObjectStorage):
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    await asyncio.gather(*(storage.put("race/key.bin", p, "application/octet-stream") for p in payloads))
    assert await storage.get("race/key.bin") in payloads
    assert await storage.list_keys("race/") == ["race/key.bin"]


async def test_ping(storage: ObjectStorage):
    await storage.ping()


def test_direct_url(storage: ObjectStorage):
    assert storage.direct_url("p/a b.png") == "https://cdn.example.com/media/p/a%20b.png"


@pytest.mark.parametrize(
    "key",
    ["../escape.png", "a/../../b.png", "/etc/passwd", "a\\b.png", "a\x00b", "", "a//b.png", "./a.png", "a/"],
)
async def test_unsafe_keys_are_refused(storage: ObjectStorage, key: str):
    with pytest.raises(ValueError):
        await storage.put(key, b"x", "image/png")
    with pytest.raises(ValueError):
        await storage.get(key)
    with pytest.raises(ValueError):
        await storage.delete([key])


@pytest.mark.parametrize("prefix", ["../", "/abs/", "a/../b"])
async def test_unsafe_prefixes_are_refused(storage: ObjectStorage, prefix: str):
    with pytest.raises(ValueError):
        await storage.list_keys(prefix)
    with pytest.raises(ValueError):
        await storage.delete_prefix(prefix)


# --- backend specifics -------------------------------------------------------------------------


async def test_local_never_writes_outside_root(tmp_path: Path):
    root = tmp_path / "root"
    store = LocalStorage(root)
    with pytest.raises(ValueError):
        await store.put("../outside.png", b"x", "image/png")
    assert not (tmp_path / "outside.png").exists()
    await store.put("a/b/c.png", b"x", "image/png")
    assert (root / "a" / "b" / "c.png").read_bytes() == b"x"


async def test_local_leaves_no_temp_files_and_prunes_empty_dirs(tmp_path: Path):
    store = LocalStorage(tmp_path)
    await store.put("x/y/z.png", b"data", "image/png")
    assert [p.name for p in (tmp_path / "x" / "y").iterdir()] == ["z.png"]
    await store.delete(["x/y/z.png"])
    assert not (tmp_path / "x").exists()
    assert tmp_path.exists()  # the root itself stays


async def test_local_ping_fails_when_root_is_not_a_directory(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(OSError):
        await LocalStorage(blocker / "storage").ping()


def test_local_direct_url_without_public_base(tmp_path: Path):
    assert LocalStorage(tmp_path).direct_url("a.png") is None


async def test_s3_stores_the_content_type(s3_endpoint: str):
    bucket = f"kiln-test-{uuid.uuid4().hex[:12]}"
    store = s3_storage(s3_endpoint, bucket)
    await store.ensure_bucket()
    await store.ensure_bucket()  # idempotent
    await store.put("img/a.webp", b"RIFF....WEBP", "image/webp")
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    head = client.head_object(Bucket=bucket, Key="img/a.webp")
    assert head["ContentType"] == "image/webp"
    assert head["ContentLength"] == len(b"RIFF....WEBP")
    assert store.direct_url("img/a.webp") is None
    await store.close()


async def test_s3_deletes_in_batches_of_at_most_1000(s3_endpoint: str):
    # AWS refuses DeleteObjects with more than 1000 keys; moto does not, so count what is sent.
    store = s3_storage(s3_endpoint, f"kiln-test-{uuid.uuid4().hex[:12]}")
    await store.ensure_bucket()
    batches: list[int] = []

    def record(params, **_):
        batches.append(len(params["Delete"]["Objects"]))

    store._client.meta.events.register("provide-client-params.s3.DeleteObjects", record)
    await store.delete([f"k/{i}" for i in range(2500)])
    assert batches == [1000, 1000, 500]
    await store.close()


async def test_s3_ping_fails_for_a_missing_bucket(s3_endpoint: str):
    store = s3_storage(s3_endpoint, f"kiln-absent-{uuid.uuid4().hex[:12]}")
    with pytest.raises(Exception):  # noqa: B017 - botocore's ClientError (404)
        await store.ping()


async def test_s3_ping_fails_fast_for_an_unreachable_endpoint():
    store = s3_storage("http://127.0.0.1:1", "kiln")
    start = asyncio.get_running_loop().time()
    with pytest.raises(Exception):  # noqa: B017 - botocore's EndpointConnectionError
        await store.ping()
    assert asyncio.get_running_loop().time() - start < 10


def test_create_storage_picks_the_backend(tmp_path: Path):
    local = create_storage(Settings(storage=StorageSettings(backend="local", local_dir=tmp_path)))
    assert isinstance(local, LocalStorage) and local.root == tmp_path
    s3 = create_storage(
        Settings(
            storage=StorageSettings(
                backend="s3",
                s3_bucket="b",
                s3_endpoint_url="http://127.0.0.1:9000",
                s3_access_key_id="k",
                s3_secret_access_key="s",
                public_base_url="https://cdn.example.com",
            )
        )
    )
    assert isinstance(s3, S3Storage) and s3.bucket == "b"
    assert s3.direct_url("x/y.png") == "https://cdn.example.com/x/y.png"
