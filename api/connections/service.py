"""The rules of connection profiles, and which provider, model and connection a generation runs with.

A connection is a project's saved way to reach a provider: URL, encrypted API key, model, default
parameters and provider settings (`metadata`). Its key is write-only: encrypted with a key derived from
KILN_SECRET_KEY before it is stored, decrypted only to build an adapter, never returned or logged.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

import httpx
from msgspec import UNSET

from api.connections import repository
from api.connections.cache import KnownDefault, announce_change
from api.connections.schemas import (
    API_KEY_MAX_LENGTH,
    API_URL_MAX_LENGTH,
    JSON_FIELD_MAX_BYTES,
    MODEL_MAX_LENGTH,
    NAME_MAX_LENGTH,
    ConnectionRecord,
    ConnectionTestResult,
    CreateConnectionRequest,
    ModelRecord,
    UpdateConnectionRequest,
    connection_record,
)
from api.envelope import Pagination
from api.parsing import check_json_object, check_text
from api.resources import Resources
from shared.connections import (
    ResolvedConnection,
    override_permissions,
    project_outbound_policy,
    stored_connection,
)
from shared.crypto import SecretUnreadable, encrypt_secret
from shared.enhancer_llm import LlmEnhancer
from shared.errors import KilnError, NotFound, ProviderPermanent, ProviderRetryable, ValidationFailed
from shared.jsonlimits import decode_json_text
from shared.llm import ChatEndpoint
from shared.logging import get_logger
from shared.models import new_id
from shared.netguard import OutboundPolicy, OutboundUrlRefused, check_url_syntax
from shared.outbound import outbound_client
from shared.providers import (
    CAPABILITIES,
    PROVIDER_NAMES,
    SECRET_SETTING_KEYS,
    connection_settings_problems,
    get_provider,
    validate_parameters,
)
from shared.providers.vendor_http import URL_FORBIDDEN
from shared.queueing import queue_for_provider
from shared.settings import Settings

log = get_logger(__name__)

T = TypeVar("T")

LIST_DEFAULT_LIMIT = 50
LIST_MAX_LIMIT = 100
LIST_MAX_OFFSET = 10_000
# `GET .../models` and `POST .../test` answer an HTTP client that is waiting: never longer than this.
VENDOR_CALL_MAX_SECONDS = 30.0


class ConnectionNotFound(NotFound):
    default_message = "Connection not found"


class ProviderCallFailed(KilnError):
    """The provider answered `GET .../models` with an error (its code and message are passed on)."""

    status_code = 502
    code = "PROVIDER_ERROR"
    default_message = "The provider answered with an error"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ProviderCallTimedOut(KilnError):
    status_code = 504
    code = "PROVIDER_TIMEOUT"
    default_message = "The provider did not answer in time"


# --- validation -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionFields:
    """A connection's fields as they will be stored (the key still plain: encrypted on write)."""

    name: str
    provider: str
    api_url: str | None
    api_key: str | None
    model: str | None
    is_default: bool
    default_parameters: dict[str, Any]
    metadata: dict[str, Any]
    timeout_seconds: float | None
    max_concurrency: int | None


class _Problems:
    """Collects every bad field so that one response names them all."""

    def __init__(self) -> None:
        self.details: list[dict[str, Any]] = []

    def add(self, field: str, message: str) -> None:
        self.details.append({"field": field, "message": message})

    def check(self, field: str, run: Callable[[], T]) -> T | None:
        try:
            return run()
        except ValidationFailed as exc:
            self.details.extend(exc.details or [{"field": field, "message": exc.message}])
            return None

    def raise_if_any(self) -> None:
        if self.details:
            first = self.details[0]
            raise ValidationFailed(f"{first['field']}: {first['message']}", details=self.details)


def _check_api_url(value: str | None, policy: OutboundPolicy, problems: _Problems) -> str | None:
    url = problems.check("apiUrl", lambda: check_text(value, "apiUrl", max_length=API_URL_MAX_LENGTH))
    if not url:
        return None  # the provider's default URL
    try:
        check_url_syntax(url, policy)
    except OutboundUrlRefused as exc:
        problems.add("apiUrl", str(exc))
        return None
    return url


def _load_json(value: Any) -> Any:
    """A JSON value that may arrive as text (a jsonb column read as a string): ValueError if malformed or
    nested deeper than JSON_DEPTH_LIMIT."""
    return decode_json_text(value) if isinstance(value, str) else value


def _check_metadata(
    provider: str | None, value: dict[str, Any] | None, policy: OutboundPolicy, problems: _Problems
) -> dict[str, Any]:
    if value is None:
        value = {}
    checked = problems.check(
        "metadata", lambda: check_json_object(value, "metadata", max_bytes=JSON_FIELD_MAX_BYTES)
    )
    if checked is None:
        return {}
    for key in checked:
        if key.lower() in SECRET_SETTING_KEYS:  # metadata is returned as stored
            problems.add(
                f"metadata.{key}",
                "credentials belong in apiKey (encrypted, never returned); metadata is returned as stored"
                + (f" ({hint})" if provider and (hint := CAPABILITIES[provider].api_key_hint) else ""),
            )
        elif key.lower().endswith("url") and isinstance(checked[key], str) and checked[key]:
            try:
                check_url_syntax(checked[key], policy)
            except OutboundUrlRefused as exc:
                problems.add(f"metadata.{key}", str(exc))
    if provider is not None:
        for problem in connection_settings_problems(provider, checked):
            problems.add(f"metadata.{problem['field']}", problem["message"])
    return checked


def _check_default_parameters(
    resources: Resources,
    provider: str | None,
    value: dict[str, Any] | None,
    metadata: dict[str, Any],
    problems: _Problems,
) -> dict[str, Any]:
    if not value:
        return {}
    checked = problems.check(
        "defaultParameters",
        lambda: check_json_object(value, "defaultParameters", max_bytes=JSON_FIELD_MAX_BYTES),
    )
    if checked is None or provider is None:
        return {}
    try:
        return validate_parameters(
            provider,
            checked,
            permissions=override_permissions(resources.settings, server_default=False),
            connection_settings=metadata,
        )
    except ValidationFailed as exc:
        for detail in exc.details or []:
            problems.add(detail["field"].replace("parameters", "defaultParameters", 1), detail["message"])
        return {}


def _check_fields(
    resources: Resources,
    *,
    policy: OutboundPolicy,  # the project's: URLs it lists may be literal private/loopback IPs
    name: str | None,
    provider: str | None,
    api_url: str | None,
    api_key: str | None,
    model: str | None,
    is_default: bool,
    default_parameters: dict[str, Any] | None,
    metadata: dict[str, Any] | None,
    timeout_seconds: float | None,
    max_concurrency: int | None,
) -> ConnectionFields:
    problems = _Problems()
    checked_name = problems.check(
        "name", lambda: check_text(name, "name", max_length=NAME_MAX_LENGTH, required=True)
    )
    if provider not in PROVIDER_NAMES:
        problems.add("provider", f"must be one of {', '.join(PROVIDER_NAMES)}")
        provider = None
    url = _check_api_url(api_url, policy, problems)
    key = problems.check("apiKey", lambda: check_text(api_key, "apiKey", max_length=API_KEY_MAX_LENGTH))
    checked_model = problems.check("model", lambda: check_text(model, "model", max_length=MODEL_MAX_LENGTH))
    checked_metadata = _check_metadata(provider, metadata, policy, problems)
    parameters = _check_default_parameters(
        resources, provider, default_parameters, checked_metadata, problems
    )
    problems.raise_if_any()
    assert checked_name is not None and provider is not None
    return ConnectionFields(
        name=checked_name,
        provider=provider,
        api_url=url,
        api_key=key or None,
        model=checked_model or None,
        is_default=is_default,
        default_parameters=parameters,
        metadata=checked_metadata,
        timeout_seconds=timeout_seconds,
        max_concurrency=max_concurrency,
    )


async def outbound_policy_of(resources: Resources, project_id: uuid.UUID) -> OutboundPolicy:
    """The policy a project's URLs are checked against: the network settings plus its allowlist."""
    async with resources.reader.connect() as conn:
        return await project_outbound_policy(conn, resources.settings, project_id)


def validate_create(
    resources: Resources, body: CreateConnectionRequest, policy: OutboundPolicy
) -> ConnectionFields:
    return _check_fields(
        resources,
        policy=policy,
        name=body.name,
        provider=body.provider,
        api_url=body.api_url,
        api_key=body.api_key,
        model=body.model,
        is_default=body.is_default,
        default_parameters=body.default_parameters,
        metadata=body.metadata,
        timeout_seconds=body.timeout_seconds,
        max_concurrency=body.max_concurrency,
    )


def _stored_values(fields: ConnectionFields, secret_key: str, *, with_key: bool) -> dict[str, Any]:
    values: dict[str, Any] = {
        "name": fields.name,
        "provider": fields.provider,
        "api_url": fields.api_url,
        "model": fields.model,
        "is_default": fields.is_default,
        "default_parameters": fields.default_parameters,
        "meta": fields.metadata,
        "timeout_seconds": fields.timeout_seconds,
        "max_concurrency": fields.max_concurrency,
    }
    if with_key:
        values["api_key_encrypted"] = encrypt_secret(secret_key, fields.api_key) if fields.api_key else None
    return values


# --- CRUD -------------------------------------------------------------------------------------------


async def create_connection(
    resources: Resources, project_id: uuid.UUID, fields: ConnectionFields
) -> ConnectionRecord:
    values = _stored_values(fields, resources.settings.secret_key, with_key=True)
    async with resources.engine.begin() as conn:
        if fields.is_default:
            await repository.lock_project_defaults(conn, project_id)
            await repository.clear_default(conn, project_id)
        row = await repository.insert_connection(conn, {"id": new_id(), "project_id": project_id, **values})
    await announce_change(resources.redis, project_id)
    log.info("connection created", connection_id=str(row.id), provider=row.provider)
    return connection_record(row)


async def get_connection(
    resources: Resources, project_id: uuid.UUID, connection_id: uuid.UUID
) -> ConnectionRecord:
    async with resources.reader.connect() as conn:
        row = await repository.get_connection(conn, project_id, connection_id)
    if row is None:
        raise ConnectionNotFound()
    return connection_record(row)


async def list_connections(
    resources: Resources, project_id: uuid.UUID, *, limit: int, offset: int
) -> tuple[list[ConnectionRecord], Pagination]:
    async with resources.reader.connect() as conn:
        rows = await repository.list_connections(conn, project_id, limit=limit + 1, offset=offset)
        total = await repository.count_connections(conn, project_id)
    has_more = len(rows) > limit
    pagination = Pagination(limit=limit, offset=offset, total=total, has_more=has_more, next_cursor=None)
    return [connection_record(row) for row in rows[:limit]], pagination


async def update_connection(
    resources: Resources, project_id: uuid.UUID, connection_id: uuid.UUID, body: UpdateConnectionRequest
) -> ConnectionRecord:
    """Partial update: the resulting connection is validated whole (new defaults against its provider)."""
    async with resources.engine.begin() as conn:
        if body.is_default is True:
            await repository.lock_project_defaults(conn, project_id)
        current = await repository.lock_connection(conn, project_id, connection_id)
        if current is None:
            raise ConnectionNotFound()

        def pick(value: Any, stored: Any) -> Any:
            return stored if value is UNSET else value

        provider = pick(body.provider, current.provider)
        if provider != current.provider:
            raise ValidationFailed.field(
                "provider", "cannot be changed; create a new connection for another provider"
            )
        key_changed = body.api_key is not UNSET
        fields = _check_fields(
            resources,
            policy=await project_outbound_policy(conn, resources.settings, project_id),
            name=pick(body.name, current.name),
            provider=provider,
            api_url=pick(body.api_url, current.api_url),
            api_key=body.api_key if isinstance(body.api_key, str) else None,
            model=pick(body.model, current.model),
            is_default=pick(body.is_default, current.is_default),
            default_parameters=pick(body.default_parameters, current.default_parameters),
            metadata=pick(body.metadata, current.meta),
            timeout_seconds=pick(body.timeout_seconds, current.timeout_seconds),
            max_concurrency=pick(body.max_concurrency, current.max_concurrency),
        )
        values = _stored_values(fields, resources.settings.secret_key, with_key=key_changed)
        if fields.is_default and not current.is_default:
            await repository.clear_default(conn, project_id)
        row = await repository.update_connection(conn, project_id, connection_id, values)
    assert row is not None  # locked above
    await announce_change(resources.redis, project_id)
    log.info("connection updated", connection_id=str(row.id), key_changed=key_changed)
    return connection_record(row)


async def delete_connection(resources: Resources, project_id: uuid.UUID, connection_id: uuid.UUID) -> None:
    """Generations already queued with it fail with CONNECTION_NOT_FOUND when a worker picks them up."""
    async with resources.engine.begin() as conn:
        if not await repository.delete_connection(conn, project_id, connection_id):
            raise ConnectionNotFound()
    await announce_change(resources.redis, project_id)
    log.info("connection deleted", connection_id=str(connection_id))


# --- talking to the provider ------------------------------------------------------------------------


async def _resolved(
    resources: Resources, project_id: uuid.UUID, connection_id: uuid.UUID
) -> tuple[ResolvedConnection, OutboundPolicy]:
    """The connection as an adapter gets it, and the policy its calls are made under."""
    async with resources.reader.connect() as conn:
        row = await repository.get_connection(conn, project_id, connection_id)
        if row is None:
            raise ConnectionNotFound()
        policy = await project_outbound_policy(conn, resources.settings, project_id)
    resolved = stored_connection(resources.settings, row)  # SecretUnreadable is the caller's to word
    timeout = min(resolved.connection.timeout_seconds, VENDOR_CALL_MAX_SECONDS)
    return replace(resolved, connection=replace(resolved.connection, timeout_seconds=timeout)), policy


async def _with_adapter(
    settings: Settings,
    resolved: ResolvedConnection,
    policy: OutboundPolicy,
    call: Callable[[Any], Awaitable[T]],
) -> T:
    """Run `call(adapter)` with a short-lived guarded HTTP client (these routes are rare: settings
    screens), bounded by the connection's timeout. Every address it connects to is checked then."""
    timeout = resolved.connection.timeout_seconds
    async with outbound_client(settings, timeout, policy=policy) as http:
        adapter = get_provider(resolved.provider, http, resolved.connection)
        async with asyncio.timeout(timeout + 1):
            return await call(adapter)


def _timed_out(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or isinstance(exc.__cause__, httpx.TimeoutException)


async def list_models(
    resources: Resources, project_id: uuid.UUID, connection_id: uuid.UUID
) -> list[ModelRecord]:
    """The provider's baked-in list (static providers), else the list the provider serves now."""
    async with resources.reader.connect() as conn:
        row = await repository.get_connection(conn, project_id, connection_id)
    if row is None:
        raise ConnectionNotFound()
    caps = CAPABILITIES[row.provider]
    if caps.model_list_style == "static":
        return [ModelRecord(id=m.id, label=m.label) for m in caps.static_models]
    try:
        resolved, policy = await _resolved(resources, project_id, connection_id)
    except SecretUnreadable:
        raise ValidationFailed.field(
            "apiKey", "the stored key cannot be decrypted with the current KILN_SECRET_KEY; set it again"
        ) from None
    try:
        models = await _with_adapter(
            resources.settings, resolved, policy, lambda adapter: adapter.list_models()
        )
    except ProviderPermanent as exc:
        if exc.code == URL_FORBIDDEN:  # the connection's own URL: the client can fix it
            raise ValidationFailed.field("apiUrl", exc.message) from None
        raise ProviderCallFailed(exc.code, exc.message) from None
    except (ProviderRetryable, TimeoutError) as exc:
        if _timed_out(exc):
            raise ProviderCallTimedOut(
                f"the provider did not answer within {resolved.connection.timeout_seconds:g} s"
            ) from None
        raise ProviderCallFailed("PROVIDER_UNAVAILABLE", str(getattr(exc, "message", exc))) from None
    except Exception as exc:
        log.error(
            "model list: the adapter failed unexpectedly",
            provider=row.provider,
            error_type=type(exc).__name__,
        )
        raise ProviderCallFailed("PROVIDER_ERROR", "the provider adapter failed unexpectedly") from None
    return [ModelRecord(id=m.id, label=m.label) for m in models]


async def test_connection(
    resources: Resources, project_id: uuid.UUID, connection_id: uuid.UUID
) -> ConnectionTestResult:
    """One cheap authenticated call to the provider; its failure is the answer, not an error."""
    try:
        resolved, policy = await _resolved(resources, project_id, connection_id)
    except SecretUnreadable:
        return ConnectionTestResult(
            ok=False,
            error_code="CONNECTION_SECRET_UNREADABLE",
            error_message="the stored key cannot be decrypted with the current KILN_SECRET_KEY; set it again",
        )
    try:
        await _with_adapter(resources.settings, resolved, policy, lambda adapter: adapter.test())
    except ProviderPermanent as exc:
        return ConnectionTestResult(ok=False, error_code=exc.code, error_message=exc.message)
    except (ProviderRetryable, TimeoutError) as exc:
        if _timed_out(exc):
            timeout = resolved.connection.timeout_seconds
            message = f"the provider did not answer within {timeout:g} s"
            return ConnectionTestResult(ok=False, error_code="PROVIDER_TIMEOUT", error_message=message)
        return ConnectionTestResult(
            ok=False, error_code="PROVIDER_UNAVAILABLE", error_message=str(getattr(exc, "message", exc))
        )
    except Exception as exc:
        # An adapter bug. No traceback: the console renderer prints frame locals, which hold the key.
        log.error(
            "connection test: the adapter failed unexpectedly",
            provider=resolved.provider,
            error_type=type(exc).__name__,
        )
        return ConnectionTestResult(
            ok=False, error_code="PROVIDER_ERROR", error_message="the provider adapter failed unexpectedly"
        )
    return ConnectionTestResult(ok=True)


# --- a connection as the prompt engine ----------------------------------------------------------------

# Providers whose connections speak OpenAI's API, chat completions included.
CHAT_PROVIDERS = ("openai", "nanogpt")
_ENHANCER_FIELD = "enhancementOptions.connectionId"


@asynccontextmanager
async def connection_enhancer(
    resources: Resources, project_id: uuid.UUID, connection_id: uuid.UUID, model: str | None
) -> AsyncIterator[LlmEnhancer]:
    """The project's own connection as the LLM engine of one create: its URL and key, a chat `model`
    (default KILN_ENHANCER_LLM_MODEL), calls under the project's outbound policy. 400 naming the field
    for another project's connection, one that speaks no chat API, or no model."""
    try:
        resolved, policy = await _resolved(resources, project_id, connection_id)
    except ConnectionNotFound:
        raise ValidationFailed.field(_ENHANCER_FIELD, "connection not found") from None
    except SecretUnreadable:
        raise ValidationFailed.field(_ENHANCER_FIELD, "its key cannot be decrypted; set it again") from None
    if resolved.provider not in CHAT_PROVIDERS:
        raise ValidationFailed.field(
            _ENHANCER_FIELD,
            f"a {resolved.provider} connection has no chat API (use one of: {', '.join(CHAT_PROVIDERS)})",
        )
    chat_model = model or resources.settings.enhancer.llm_model
    if not chat_model:
        raise ValidationFailed.field("enhancementOptions.model", "required: a chat model of that connection")
    endpoint = ChatEndpoint(
        base_url=resolved.connection.api_url or CAPABILITIES[resolved.provider].default_url or "",
        model=chat_model,
        api_key=resolved.connection.api_key,
        timeout_seconds=resources.settings.enhancer.timeout_seconds,
    )
    async with outbound_client(resources.settings, endpoint.timeout_seconds, policy=policy) as http:
        yield LlmEnhancer(endpoint, http, resources.redis)


# --- models by name (the compatible APIs) ------------------------------------------------------------

# A project with more connections than this lists (and resolves by name) the first ones only.
MODEL_SOURCES_LIMIT = 200


@dataclass(frozen=True, slots=True)
class UsableModel:
    """A name the compatible APIs accept as `model` (OpenAI's `GET /v1/models`, Automatic1111's
    `sd-models`) and what it runs on."""

    id: str  # what a client sends as `model`
    provider: str
    connection_id: uuid.UUID | None  # None: the server's default provider
    model: str | None  # the provider model (None: the connection's own, else the provider's default)
    created_at: datetime | None


async def usable_models(resources: Resources, project_id: uuid.UUID) -> list[UsableModel]:
    """What a create without a connection runs on first (the project's default connection, else the
    server's default provider), then each of the project's connections by name, then each model of a
    provider that publishes a fixed list, on the first of those targets that speaks it. A name listed
    twice keeps its first entry."""
    async with resources.reader.connect() as conn:
        rows = await repository.list_model_sources(conn, project_id, limit=MODEL_SOURCES_LIMIT)
    targets = [UsableModel(row.name, row.provider, row.id, row.model, row.created_at) for row in rows]
    if not any(row.is_default for row in rows):
        provider = resources.settings.providers.default
        model = resources.settings.providers.model or CAPABILITIES[provider].default_model
        targets.insert(0, UsableModel(model or provider, provider, None, model, None))
    found: dict[str, UsableModel] = {}
    for target in targets:
        found.setdefault(target.id, target)
    for target in targets:
        for info in CAPABILITIES[target.provider].static_models:
            found.setdefault(info.id, replace(target, id=info.id, model=info.id))
    return list(found.values())


async def target_of_model(resources: Resources, project_id: uuid.UUID, name: str | None) -> UsableModel:
    """What a compatible API's `model` names: a listed name (`usable_models`); None, the default
    target; else, when the default target's provider lists its models live (ComfyUI checkpoints,
    Automatic1111), that model on the default target (the provider refuses it if it has no such model).
    400 naming `model` otherwise."""
    models = await usable_models(resources, project_id)
    default = models[0]  # the default target always leads the list
    if name is None:
        return default
    for entry in models:
        if entry.id == name:
            return entry
    if CAPABILITIES[default.provider].model_list_style != "static":
        return replace(default, id=name, model=name)
    raise ValidationFailed.field("model", f"unknown model {name!r}; the models list names the usable ones")


# --- generation target ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GenerationTarget:
    provider: str
    model: str | None
    connection_id: uuid.UUID | None
    parameters: dict[str, Any]
    queue: str  # where `kiln.generate` goes: a queue per provider


async def _project_default(resources: Resources, project_id: uuid.UUID) -> Any:
    """The project's default connection (None: it has none), from the process's cache when known."""
    cache = resources.default_connections
    known = cache.get(project_id)
    if known is not None:
        return known.row
    ticket = cache.ticket()
    async with resources.reader.connect() as conn:
        row = await repository.find_generation_connection(conn, project_id, None)
    if ticket is not None:
        cache.fill(ticket, project_id, KnownDefault(row))
    return row


async def resolve_generation_target(
    resources: Resources,
    project_id: uuid.UUID,
    connection_id: uuid.UUID | None,
    model: str | None,
    parameters: dict[str, Any],
) -> GenerationTarget:
    """The connection asked for, else the project's default, else the server default; parameters are
    merged over the connection's defaults and checked against that provider's schema (400 naming
    `parameters.<name>` or `connectionId`)."""
    settings = resources.settings
    if connection_id is None:
        row = await _project_default(resources, project_id)
    else:
        async with resources.reader.connect() as conn:
            row = await repository.find_generation_connection(conn, project_id, connection_id)
    if connection_id is not None and row is None:
        raise ValidationFailed.field("connectionId", "connection not found")
    if row is not None:
        provider = row["provider"]
        configured_model = row["model"]
        defaults = _load_json(row["default_parameters"]) or {}
        chosen_connection: uuid.UUID | None = row["id"]
        connection_settings = _load_json(row["meta"]) or {}
    else:
        provider = settings.providers.default
        configured_model = settings.providers.model
        defaults = {}
        chosen_connection = None
        connection_settings = dict(settings.providers.settings)
    merged = {**defaults, **parameters}
    checked = validate_parameters(
        provider,
        merged,
        permissions=override_permissions(settings, server_default=row is None),
        connection_settings=connection_settings,
    )
    return GenerationTarget(
        provider=provider,
        model=model or configured_model or CAPABILITIES[provider].default_model,
        connection_id=chosen_connection,
        parameters=checked,
        queue=queue_for_provider(settings, provider),
    )
