"""Object storage for originals and thumbnails: a local directory or any S3-compatible service.

Both backends behave the same (one test suite runs against both). Keys are `/`-separated relative
names; both backends refuse the same unsafe keys so a key that works locally works on S3 and back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar
from urllib.parse import quote

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotocoreConnectionError

from shared.errors import StorageUnavailable

if TYPE_CHECKING:
    from shared.settings import Settings

T = TypeVar("T")

_TMP_PREFIX = ".kiln-tmp-"  # local temp files; keys may not use it, list_keys skips it
_S3_DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys per call


class ObjectMissing(KeyError):
    """No object under this key."""


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    last_modified: datetime  # aware, UTC


class ObjectStorage(Protocol):
    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Returns, raises or is cancelled only once the write has landed or failed for good."""
        ...

    async def get(self, key: str) -> bytes: ...

    async def exists(self, key: str) -> bool: ...

    async def delete(self, keys: Sequence[str]) -> None: ...

    async def delete_prefix(self, prefix: str) -> int: ...

    async def list_keys(self, prefix: str) -> list[str]: ...

    async def list_objects(self, prefix: str, *, start_after: str = "", limit: int) -> list[StoredObject]:
        """At most `limit` objects under `prefix` with keys after `start_after`, in key order (S3's)."""
        ...

    async def ping(self) -> None: ...

    def direct_url(self, key: str) -> str | None: ...


def validate_key(key: str) -> str:
    """Refuse keys that could escape the root or mean different objects on different backends."""
    if not isinstance(key, str) or not key:
        raise ValueError("storage key must be a non-empty string")
    _check_path_text(key, "key")
    if key.endswith("/"):
        raise ValueError(f"storage key must not end with '/': {key!r}")
    return key


def _is_valid_key(key: str) -> bool:
    """False for files someone else put under the root with names no key can have."""
    try:
        validate_key(key)
    except ValueError:
        return False
    return True


def validate_prefix(prefix: str) -> str:
    """Like a key, but may be empty (everything) or end with '/'."""
    if prefix:
        _check_path_text(prefix.removesuffix("/"), "prefix")
    return prefix


def _check_path_text(text: str, what: str) -> None:
    if "\x00" in text or "\\" in text:
        raise ValueError(f"storage {what} must not contain NUL or backslash: {text!r}")
    if text.startswith("/"):
        raise ValueError(f"storage {what} must be relative: {text!r}")
    for part in text.split("/"):
        # Empty and "." segments would be normalized away on disk but not on S3: refuse both.
        if part in ("", ".", ".."):
            raise ValueError(f"storage {what} has an empty, '.' or '..' segment: {text!r}")
        if part.startswith(_TMP_PREFIX):
            raise ValueError(f"storage {what} segments must not start with {_TMP_PREFIX!r}: {text!r}")


async def _in_thread_to_the_end(func: Callable[..., T], /, *args: Any) -> T:
    """`asyncio.to_thread`, except that a cancelled caller still waits for the thread to finish.

    Cancelling cannot stop a thread: with plain to_thread a cancelled put returns at once while its write
    goes on, and whoever cancelled it (an abandoned attempt, a failed upload) deletes the prefix before
    the object lands, leaving an orphan. The cancellation is delivered once the thread is done.
    """
    task = asyncio.ensure_future(asyncio.to_thread(func, *args))
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                cancelled = True
                continue
            raise
        except BaseException:
            if cancelled:
                raise asyncio.CancelledError from None
            raise
        if cancelled:
            raise asyncio.CancelledError
        return result


def direct_url_under(base: str | None, key: str) -> str | None:
    """`key` under a public base URL (a bucket website or CDN), or None without one."""
    if not base:
        return None
    return base.rstrip("/") + "/" + quote(key, safe="/~")


# --- local directory --------------------------------------------------------------------------


class LocalStorage:
    """Files under `root`. Writes are atomic (temp file + os.replace): a reader never sees half a file."""

    def __init__(self, root: Path, public_base_url: str | None = None) -> None:
        self.root = Path(root)
        self.public_base_url = public_base_url

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        # The content type is not kept on disk: the database row holds the mime type.
        await _in_thread_to_the_end(self._put, self._path(key), data)

    def _put(self, path: Path, data: bytes) -> None:
        # The directory is made only when it is missing: most puts land beside an object already there
        # (or one put a moment ago), and a mkdir of every parent on each put costs more than the write.
        for attempt in range(4):
            try:
                fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
                break
            except FileNotFoundError:
                # Not made yet, or a concurrent delete pruned a directory of this path: make it, again.
                if attempt == 3:
                    raise
                with contextlib.suppress(FileNotFoundError):  # pruned while we made it: next round
                    path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # the row that points here is committed after: the bytes must be on disk
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; a web server in front may need to read it
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    async def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectMissing(key) from None

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._path(key).is_file)

    async def delete(self, keys: Sequence[str]) -> None:
        paths = [self._path(k) for k in keys]  # validate all before deleting any
        await asyncio.to_thread(self._delete_paths, paths)

    def _delete_paths(self, paths: Sequence[Path]) -> int:
        deleted = 0
        for path in paths:
            try:
                path.unlink()
                deleted += 1
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                continue
            self._prune(path.parent)
        return deleted

    def _prune(self, directory: Path) -> None:
        """Remove directories left empty, up to the root, so deleted generations leave no trail."""
        root = self.root.resolve()
        current = directory
        while current.resolve() != root and root in current.resolve().parents:
            try:
                current.rmdir()  # fails unless empty, which is the point
            except OSError:
                return
            current = current.parent

    async def delete_prefix(self, prefix: str) -> int:
        validate_prefix(prefix)
        return await asyncio.to_thread(
            lambda: self._delete_paths([self._path(k) for k in self._list(prefix)])
        )

    async def list_keys(self, prefix: str) -> list[str]:
        validate_prefix(prefix)
        return await asyncio.to_thread(self._list, prefix)

    async def list_objects(self, prefix: str, *, start_after: str = "", limit: int) -> list[StoredObject]:
        validate_prefix(prefix)
        return await asyncio.to_thread(self._list_objects, prefix, start_after, limit)

    def _list_objects(self, prefix: str, start_after: str, limit: int) -> list[StoredObject]:
        directory, _, _ = prefix.rpartition("/")
        found: list[StoredObject] = []
        for key, mtime in self._walk_in_key_order(directory, prefix, start_after):
            found.append(StoredObject(key, datetime.fromtimestamp(mtime, UTC)))
            if len(found) >= limit:
                break
        return found

    def _walk_in_key_order(self, rel_dir: str, prefix: str, start_after: str) -> Iterator[tuple[str, float]]:
        """(key, mtime) under `rel_dir` in S3's order (the keys sorted as strings), lazily: a page costs
        the directories on its way, not a walk of the whole tree. Subtrees wholly at or before
        `start_after` are skipped unopened."""
        path = self.root.joinpath(*rel_dir.split("/")) if rel_dir else self.root
        try:
            entries = list(os.scandir(path))
        except (FileNotFoundError, NotADirectoryError):
            return
        base = f"{rel_dir}/" if rel_dir else ""
        # A directory sorts as "name/": every key under it starts so, which keeps the walk in key order.
        keyed = sorted((base + e.name + ("/" if e.is_dir(follow_symlinks=False) else ""), e) for e in entries)
        for key, entry in keyed:
            if entry.name.startswith(_TMP_PREFIX):
                continue
            if key.endswith("/"):
                inside_prefix = key.startswith(prefix) or prefix.startswith(key)
                already_listed = key <= start_after and not start_after.startswith(key)
                if inside_prefix and not already_listed:
                    yield from self._walk_in_key_order(key.removesuffix("/"), prefix, start_after)
                continue
            if key <= start_after or not key.startswith(prefix) or not _is_valid_key(key):
                continue
            try:
                mtime = entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:  # deleted since the directory was read
                continue
            yield key, mtime

    def _list(self, prefix: str) -> list[str]:
        # S3 semantics: a plain string prefix. Walk only the deepest directory the prefix names.
        directory, _, _ = prefix.rpartition("/")
        start = self.root.joinpath(*directory.split("/")) if directory else self.root
        if not start.is_dir():
            return []
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(_TMP_PREFIX)]
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(_TMP_PREFIX):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix) and _is_valid_key(key):
                    keys.append(key)
        return sorted(keys)

    async def ping(self) -> None:
        await asyncio.to_thread(self._ping)

    def _ping(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise PermissionError(f"storage directory {self.root} is not writable")

    def direct_url(self, key: str) -> str | None:
        return direct_url_under(self.public_base_url, key)

    async def close(self) -> None:
        """Nothing to release; here so both backends can be closed the same way."""


# --- S3-compatible service --------------------------------------------------------------------


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _is_missing(exc: ClientError) -> bool:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status == 404 or _error_code(exc) in ("NoSuchKey", "404", "NotFound")


def is_storage_outage(exc: BaseException) -> bool:
    """The store could not serve the call now (the same call may work later): no connection, a
    timeout, a 5xx or throttling. A 4xx (missing key, denied) is not an outage."""
    # EndpointConnectionError, ConnectTimeoutError (connection); ReadTimeoutError, ConnectionClosedError
    if isinstance(exc, (BotocoreConnectionError, HTTPClientError)):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or _error_code(exc) in ("SlowDown", "ServiceUnavailable", "InternalError")
    return False


class S3Storage:
    """Any S3 endpoint (AWS, MinIO, R2, ...) through boto3; every call runs in a thread."""

    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        public_base_url: str | None = None,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
    ) -> None:
        self.bucket = bucket
        self.region = region
        self.public_base_url = public_base_url
        # A session of our own: boto3's default session is not safe to create clients from in threads.
        session = boto3.session.Session(
            aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key, region_name=region
        )
        # MinIO and most self-hosted endpoints need path-style addressing; AWS picks its own.
        addressing: Literal["path", "auto"] = "path" if endpoint_url else "auto"
        # Checksums only where S3 requires them: several S3-compatible services reject the
        # CRC32 headers that botocore sends by default since 1.36.
        compat: dict[str, Any] = {
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
        }
        config = Config(
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=20,
            s3={"addressing_style": addressing},
            **compat,
        )
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        # /ready must answer fast when storage is down: one try, short timeouts.
        ping_config = Config(
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=2,
            read_timeout=3,
            max_pool_connections=2,
            s3={"addressing_style": addressing},
            **compat,
        )
        self._ping_client = session.client("s3", endpoint_url=endpoint_url, config=ping_config)

    async def _call(self, fn: Callable[..., T], /, *args: Any, to_the_end: bool = False, **kwargs: Any) -> T:
        """Run a blocking boto3 call in a thread; an outage leaves as StorageUnavailable (a 503).
        `to_the_end`: a cancelled caller still waits for the thread (see `_in_thread_to_the_end`)."""
        call = functools.partial(fn, *args, **kwargs)
        try:
            return await (_in_thread_to_the_end(call) if to_the_end else asyncio.to_thread(call))
        except (ClientError, BotocoreConnectionError, HTTPClientError) as exc:
            if is_storage_outage(exc):
                raise StorageUnavailable(
                    f"Image storage is unavailable ({type(exc).__name__}); retry later"
                ) from exc
            raise

    async def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (first start against a fresh MinIO, tests)."""
        await self._call(self._ensure_bucket)

    def _ensure_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if not _is_missing(exc):
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":  # us-east-1 refuses an explicit LocationConstraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**kwargs)
        except ClientError as exc:
            if _error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        validate_key(key)
        # To the end: a cancelled put must not land after its caller deleted the prefix.
        await self._call(self._put, key, data, content_type, to_the_end=True)

    def _put(self, key: str, data: bytes, content_type: str) -> None:
        self._client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)

    async def get(self, key: str) -> bytes:
        validate_key(key)
        return await self._call(self._get, key)

    def _get(self, key: str) -> bytes:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _is_missing(exc):
                raise ObjectMissing(key) from None
            raise
        with contextlib.closing(response["Body"]) as body:
            return bytes(body.read())

    async def exists(self, key: str) -> bool:
        validate_key(key)
        return await self._call(self._exists, key)

    def _exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as exc:
            if _is_missing(exc):
                return False
            raise

    async def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            validate_key(key)
        if keys:
            await self._call(self._delete, list(keys))

    def _delete(self, keys: list[str]) -> int:
        deleted = 0
        for i in range(0, len(keys), _S3_DELETE_BATCH):
            batch = keys[i : i + _S3_DELETE_BATCH]
            response = self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise RuntimeError(
                    f"S3 refused to delete {len(errors)} object(s), e.g. {first.get('Key')}: "
                    f"{first.get('Code')} {first.get('Message')}"
                )
            deleted += len(batch)
        return deleted

    async def delete_prefix(self, prefix: str) -> int:
        validate_prefix(prefix)
        return await self._call(self._delete_prefix, prefix)

    def _delete_prefix(self, prefix: str) -> int:
        # Each listing page holds at most 1000 keys: exactly one DeleteObjects batch.
        deleted = 0
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            keys = [obj["Key"] for obj in page.get("Contents", [])]
            if keys:
                deleted += self._delete(keys)
        return deleted

    async def list_keys(self, prefix: str) -> list[str]:
        validate_prefix(prefix)
        return await self._call(self._list, prefix)

    def _list(self, prefix: str) -> list[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        keys = [
            obj["Key"]
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix)
            for obj in page.get("Contents", [])
        ]
        return sorted(keys)

    async def list_objects(self, prefix: str, *, start_after: str = "", limit: int) -> list[StoredObject]:
        validate_prefix(prefix)
        return await self._call(self._list_objects, prefix, start_after, limit)

    def _list_objects(self, prefix: str, start_after: str, limit: int) -> list[StoredObject]:
        found: list[StoredObject] = []
        paginator = self._client.get_paginator("list_objects_v2")
        after: dict[str, Any] = {"StartAfter": start_after} if start_after else {}
        pages = paginator.paginate(
            Bucket=self.bucket,
            Prefix=prefix,
            **after,
            PaginationConfig={"MaxItems": limit, "PageSize": min(limit, 1000)},
        )
        for page in pages:
            for obj in page.get("Contents", []):
                found.append(StoredObject(obj["Key"], obj["LastModified"].astimezone(UTC)))
        return found[:limit]

    async def ping(self) -> None:
        await self._call(self._ping_client.head_bucket, Bucket=self.bucket)

    def direct_url(self, key: str) -> str | None:
        return direct_url_under(self.public_base_url, key)

    async def close(self) -> None:
        """Close the HTTP connection pools (on shutdown)."""
        await self._call(self._close)

    def _close(self) -> None:
        self._client.close()
        self._ping_client.close()


def create_storage(settings: Settings) -> ObjectStorage:
    """The backend the settings choose. Connects to nothing; call `ensure_bucket()` on S3 at startup."""
    cfg = settings.storage
    if cfg.backend == "local":
        return LocalStorage(cfg.local_dir, public_base_url=cfg.public_base_url)
    if cfg.backend == "s3":
        return S3Storage(
            bucket=cfg.s3_bucket,
            endpoint_url=cfg.s3_endpoint_url,
            region=cfg.s3_region,
            access_key_id=cfg.s3_access_key_id,
            secret_access_key=cfg.s3_secret_access_key,
            public_base_url=cfg.public_base_url,
        )
    raise ValueError(f"unknown storage backend {cfg.backend!r}")
