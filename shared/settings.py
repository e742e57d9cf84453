"""All configuration, read from `KILN_*` environment variables (and `.env`).

Groups are nested models; `KILN_<GROUP>_<FIELD>` sets a field, e.g. `KILN_DATABASE_URL`,
`KILN_LIMITS_GENERATIONS_PER_HOUR`. Nothing here connects to anything.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.netguard import OutboundPolicy
from shared.outbound import DEFAULT_MAX_IMAGE_RESPONSE_BYTES

DEFAULT_SECRET_KEY = "kiln-embedded-insecure-secret-key"  # noqa: S105 - refused outside embedded mode
SECRET_KEY_MIN_BYTES = 32  # HKDF stretches but cannot add entropy: a short key is a guessable key


class DatabaseSettings(BaseModel):
    url: str | None = Field(
        default=None,
        description="PostgreSQL URL (postgresql://user:pass@host/db). Empty: embedded server under var/.",
    )
    # Above the requests one API process serves at once under load, so connections are reused, not
    # opened and closed per request (an overflow connection is closed when it is returned).
    pool_size: int = Field(default=20, description="Connections kept open per process.")
    max_overflow: int = Field(default=10, description="Extra connections allowed under burst.")
    statement_timeout_ms: int = Field(default=10_000, description="Server-side timeout per statement.")


class RedisSettings(BaseModel):
    url: str | None = Field(
        default=None,
        description="Redis URL for broker, rate limits and pub/sub. Empty: embedded server under var/.",
    )
    broker_url: str | None = Field(default=None, description="Celery broker URL if not the Redis above.")
    broker_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        description="Connect and socket timeout of broker connections: a send to a broker that does not "
        "answer fails after about this long (the sweeper re-sends the job).",
    )


class StorageSettings(BaseModel):
    backend: Literal["local", "s3"] = Field(default="local", description="`local` directory or `s3`.")
    local_dir: Path = Field(default=Path("var/storage"), description="Directory for the local backend.")
    s3_bucket: str = Field(default="kiln", description="Bucket for the s3 backend (created if missing).")
    s3_endpoint_url: str | None = Field(default=None, description="S3 endpoint (MinIO, R2); empty: AWS.")
    s3_region: str = Field(default="us-east-1", description="S3 region.")
    s3_access_key_id: str | None = Field(default=None, description="S3 access key (else boto3's chain).")
    s3_secret_access_key: str | None = Field(default=None, description="S3 secret key.")
    public_base_url: str | None = Field(
        default=None,
        description="If set, storageUrl is this + object key (public bucket or CDN); else an API URL.",
    )
    cache_max_age_seconds: int = Field(
        default=86_400,
        ge=0,
        description="Cache-Control max-age of public /i/<token> images: how long a deleted image may live on"
        " in caches.",
    )
    orphan_grace_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="Objects no image row points at are deleted by the reconciler once this old (keep it"
        " well above a job's storing time).",
    )
    reconcile_interval_seconds: float = Field(
        default=300.0, gt=0, description="How often the storage reconciler looks for orphaned objects."
    )


class ImageSettings(BaseModel):
    max_pixels: int = Field(
        default=40_000_000,
        ge=1,
        description="Largest image (width x height x frames) decoded, uploads and provider output alike;"
        " checked from the header before any pixel is decoded.",
    )


class ServerSettings(BaseModel):
    host: str = Field(default="127.0.0.1", description="API bind address.")
    port: int = Field(default=8000, description="API port.")
    workers: int = Field(
        default=0,
        ge=0,
        description="API server processes (0: one per CPU core; one process tops out near one core).",
    )
    public_url: str | None = Field(
        default=None,
        description="Base URL clients reach the API at (for image URLs). Default: http://host:port.",
    )
    max_body_bytes: int = Field(default=1_048_576, description="Largest JSON body accepted (413 above).")
    forwarded_allow_ips: str = Field(
        default="127.0.0.1",
        description="Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (comma-separated "
        "addresses or networks, * for any): the client address behind them is what the failed-auth "
        "throttle counts by. Behind a load balancer on another host, list it here.",
    )
    poll_cache_size: int = Field(
        default=5000,
        ge=0,
        description="Finished generations whose GET answer each API process keeps (about 2 KB each); "
        "invalidated by status events. 0: every poll reads the database.",
    )
    list_cache_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=0,
        description="Bytes of encoded list pages of finished generations (status=success, failed or "
        "cancelled) each API process keeps; a project's pages are retired by its status events. 0: every "
        "list reads the database.",
    )

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    def process_count(self) -> int:
        return self.workers or os.cpu_count() or 1


class LimitSettings(BaseModel):
    generations_per_hour: int = Field(default=100, description="Generation budget per API key per hour.")
    reads_per_hour: int = Field(default=6000, description="Read (poll/list) budget per API key per hour.")
    max_in_flight_per_project: int = Field(
        default=100, description="Pending+processing generations per project (0: no cap)."
    )
    max_batch_items: int = Field(default=100, description="Most items one batch create may hold.")
    auth_failures_per_minute: int = Field(
        default=20,
        description="Requests with unknown API keys one client address may send per minute; then 429 "
        "before any database lookup (0: no limit).",
    )
    max_streams_per_key: int = Field(
        default=20,
        description="Event streams and long polls (`Prefer: wait`) one API key may hold open (0: no cap).",
    )


class GenerationSettings(BaseModel):
    deadline_seconds: int = Field(default=3600, description="A generation not finished by then fails.")
    max_deadline_seconds: int = Field(
        default=86_400, description="Largest `deadlineSeconds` a create may ask for."
    )
    lease_seconds: int = Field(default=60, description="A worker's claim on a job; renewed while it runs.")
    max_attempts: int = Field(default=3, description="Worker attempts (claims) before a job fails.")
    provider_timeout_seconds: float = Field(default=120.0, description="Timeout of one provider call.")
    provider_retries: int = Field(default=3, description="Retries of retryable provider errors per attempt.")
    retry_max_wait_seconds: float = Field(default=30.0, description="Longest wait between provider retries.")


class ProviderSettings(BaseModel):
    """The server-wide default connection: used by generations of projects without a default connection."""

    default: str = Field(
        default="placeholder",
        description="Provider of the server-wide default connection (used when a project has none).",
    )
    api_url: str | None = Field(default=None, description="Its API URL; empty: the provider's default URL.")
    api_key: str | None = Field(
        default=None, repr=False, description="Its API key (never logged or returned)."
    )
    model: str | None = Field(default=None, description="Its model; empty: the provider's default model.")
    settings: dict[str, Any] = Field(
        default={},
        description=(
            "Its provider-specific settings as JSON, like a connection's metadata (ComfyUI `workflow` and "
            "`nodes`, Gemini `method`, Azure `api_version`, ...)."
        ),
    )
    timeout_seconds: float | None = Field(
        default=None,
        description="Its timeout of one provider call; empty: KILN_GENERATION_PROVIDER_TIMEOUT_SECONDS.",
    )
    max_concurrency: int | None = Field(
        default=None,
        description="Jobs it runs at once across all workers (a Redis semaphore); empty: no limit.",
    )
    shared_queue: str = Field(
        default="placeholder",
        description=(
            "Providers (comma list) whose jobs go to KILN_WORKER_QUEUE itself; every other provider's jobs "
            "go to `<KILN_WORKER_QUEUE>.<provider>`."
        ),
    )
    busy_retry_seconds: float = Field(
        default=1.0,
        description="A job whose connection is at its concurrency limit is re-queued after about this long.",
    )
    allow_raw_override: bool = Field(
        default=False,
        description=(
            "Accept `parameters.rawRequestOverride` on generations that run on this server-wide default "
            "connection (the operator's key); project connections always accept it."
        ),
    )
    allow_safety_override: bool = Field(
        default=False,
        description="Let `rawRequestOverride` set Gemini `safetySettings` (loosen its safety filters).",
    )

    @field_validator("default")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        # Imported here: loading the adapters is not needed to import the settings module.
        from shared.providers import PROVIDER_NAMES

        if value not in PROVIDER_NAMES:
            raise ValueError(f"unknown provider {value!r}; known: {', '.join(PROVIDER_NAMES)}")
        return value

    @field_validator("timeout_seconds")
    @classmethod
    def _positive_timeout(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value <= 3600:
            raise ValueError("must be between 0 and 3600 seconds")
        return value

    @field_validator("max_concurrency")
    @classmethod
    def _positive_concurrency(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be at least 1")
        return value

    @property
    def shared_queue_providers(self) -> frozenset[str]:
        return frozenset(p.strip() for p in self.shared_queue.split(",") if p.strip())


class WorkerSettings(BaseModel):
    concurrency: int = Field(default=2, description="Celery worker processes.")
    queue: str = Field(default="kiln.generations", description="Queue generation tasks go to.")
    sweep_interval_seconds: float = Field(default=5.0, description="How often the sweeper runs.")
    requeue_after_seconds: float = Field(
        default=10.0, description="A pending job not picked up for this long is re-enqueued."
    )
    housekeeping_interval_seconds: float = Field(
        default=600.0,
        gt=0,
        description="How often expired idempotency records and old webhook deliveries are deleted.",
    )
    maintenance_queue: str = Field(
        default="kiln.maintenance",
        description=(
            "Queue of the periodic maintenance tasks (sweeper, webhook dispatcher, housekeeping): every"
            " `kiln worker` consumes it, and `kiln beat` runs its own consumer of it so they run on time"
            " whatever the generation backlog."
        ),
    )
    maintenance_concurrency: int = Field(
        default=2,
        ge=1,
        description="Processes of `kiln beat`'s maintenance consumer (a long task never holds up a sweep).",
    )


class StatsSettings(BaseModel):
    fresh_seconds: float = Field(
        default=5.0,
        ge=0,
        description=(
            "How long an API process reuses the stats it computed for a scope (`GET /api/v1/stats`);"
            " callers of one scope meanwhile share a single computation."
        ),
    )


class NetworkSettings(BaseModel):
    allow_link_local: bool = Field(
        default=False, description="Let outbound requests reach link-local and cloud-metadata addresses."
    )
    allow_private: bool | None = Field(
        default=None,
        description=(
            "Let outbound requests reach private addresses (LAN, CGNAT, IPv6 unique-local)."
            " Empty: true in embedded mode, false in production."
        ),
    )
    allow_loopback: bool | None = Field(
        default=None,
        description=(
            "Let outbound requests reach 127.0.0.0/8 and ::1."
            " Empty: true in embedded mode, false in production."
        ),
    )
    max_image_response_bytes: int = Field(
        default=DEFAULT_MAX_IMAGE_RESPONSE_BYTES,
        ge=1024,
        description=(
            "Largest decoded answer that carries an image (binary or base64 in JSON); larger fails the"
            " generation with PROVIDER_RESPONSE_TOO_LARGE. Other answers: 8 MiB."
        ),
    )

    def policy(self) -> OutboundPolicy:
        # Settings fills both in from KILN_MODE; a bare NetworkSettings keeps the embedded defaults.
        return OutboundPolicy(
            self.allow_link_local,
            True if self.allow_private is None else self.allow_private,
            True if self.allow_loopback is None else self.allow_loopback,
        )


class WebhookSettings(BaseModel):
    timeout_seconds: float = Field(
        default=10.0, description="Timeout of one webhook POST (redirects are not followed)."
    )
    max_attempts: int = Field(default=8, ge=1, description="Tries of one webhook delivery before it fails.")
    backoff_seconds: Annotated[list[float], NoDecode] = Field(
        default=[5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 7200.0],
        description="Waits before each webhook retry (comma list); the last one repeats.",
    )
    dispatch_interval_seconds: float = Field(
        default=2.0, description="How often due webhook retries and lost webhook tasks are sent."
    )
    queue: str = Field(
        default="kiln.webhooks",
        description=(
            "Queue of webhook delivery tasks (every `kiln worker` consumes it). Empty: KILN_WORKER_QUEUE."
        ),
    )
    unsent_after_seconds: float = Field(
        default=10.0,
        gt=0,
        description=(
            "A new delivery whose task has not started by then is sent by the dispatcher (its message was"
            " lost, or the process died between the status change's commit and the send)."
        ),
    )
    breaker_failures: int = Field(
        default=5,
        ge=1,
        description="Consecutive failed attempts to one endpoint (or URL host) that open its breaker.",
    )
    breaker_cooldown_seconds: float = Field(
        default=60.0,
        gt=0,
        description=(
            "How long an open breaker postpones the deliveries to that endpoint (not counted as attempts);"
            " then one probe attempt decides whether it closes."
        ),
    )
    max_in_flight_per_project: int = Field(
        default=10,
        ge=0,
        description="Webhook requests of one project in progress at once across all workers (0: no cap).",
    )
    retention_days: float = Field(
        default=30.0, gt=0, description="Webhook deliveries older than this are deleted by housekeeping."
    )

    @field_validator("backoff_seconds", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        # `5,30,120` or `[5, 30, 120]` in the environment.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("backoff_seconds")
    @classmethod
    def _not_empty(cls, value: list[float]) -> list[float]:
        if not value or any(wait < 0 for wait in value):
            raise ValueError("needs at least one wait, none negative")
        return value


class DashboardSettings(BaseModel):
    session_hours: float = Field(
        default=12,
        gt=0,
        le=24 * 30,
        description="How long a dashboard sign-in lasts (the session in Redis and its cookie); signing in "
        "again starts a new one. A revoked key ends its sessions at their next request.",
    )


class MetricsSettings(BaseModel):
    dir: Path | None = Field(
        default=None,
        description="Where every API and worker process counts its metrics (a directory per host name): "
        "share it between the containers of one host. Empty: `<KILN_EMBEDDED_DATA_DIR>/metrics`.",
    )
    token: str | None = Field(
        default=None,
        repr=False,
        min_length=16,
        description="Bearer token (16 characters or more) that lets a Prometheus on another host scrape "
        "`GET /metrics` (`Authorization: Bearer <token>`); empty: only loopback clients may.",
    )


class EnhancerSettings(BaseModel):
    engine: Literal["builtin", "llm"] = Field(
        default="builtin",
        description="Prompt enhancement engine: `builtin` (offline templates) or `llm` (an OpenAI-compatible "
        "chat-completions endpoint, falling back to `builtin` on any failure).",
    )
    llm_url: str | None = Field(
        default=None,
        description="Base URL of the chat-completions endpoint, up to its `/v1` (OpenAI, Ollama, vLLM, "
        "llama.cpp server, LM Studio): `<url>/chat/completions` is called. Also used by conversation "
        "detection.",
    )
    llm_model: str | None = Field(default=None, description="Model name sent to the LLM endpoint.")
    llm_api_key: str | None = Field(
        default=None, repr=False, description="Bearer key for the LLM endpoint (empty: none sent)."
    )
    timeout_seconds: float = Field(
        default=4,
        gt=0,
        le=120,
        description="How long one LLM call may take before Kiln falls back to the built-in engine.",
    )
    mode: Literal["sync", "worker"] = Field(
        default="sync",
        description="`sync`: the create's 201 carries the enhanced prompt. `worker`: the 201 returns at once "
        "with the original prompt and the worker enhances before the provider call (the record's `prompt` "
        "updates then): for batch submitters who prefer throughput.",
    )

    @model_validator(mode="after")
    def _llm_needs_an_endpoint(self) -> EnhancerSettings:
        if self.engine == "llm" and not (self.llm_url and self.llm_model):
            raise ValueError(
                "KILN_ENHANCER_ENGINE=llm needs KILN_ENHANCER_LLM_URL and KILN_ENHANCER_LLM_MODEL"
            )
        return self


class CompatSettings(BaseModel):
    wait_seconds: float = Field(
        default=120,
        gt=0,
        le=3600,
        description="How long the OpenAI- and Automatic1111-compatible routes wait for their generations "
        "before answering (their clients expect images in the answer).",
    )


class EmbeddedSettings(BaseModel):
    data_dir: Path = Field(default=Path("var"), description="Where embedded PostgreSQL/Redis keep data.")
    # Both outside Linux's ephemeral range (32768-60999): an outbound connection never takes them.
    postgres_port: int = Field(default=25432, description="TCP port of the embedded PostgreSQL.")
    redis_port: int = Field(default=26379, description="TCP port of the embedded Redis.")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KILN_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        env_file=".env",
        extra="ignore",
        hide_input_in_errors=True,  # a rejected KILN_SECRET_KEY must not be echoed into a log
    )

    mode: Literal["embedded", "production"] = Field(
        default="embedded",
        description="`production` refuses default secrets and private/loopback outbound addresses.",
    )
    secret_key: str = Field(
        default=DEFAULT_SECRET_KEY,
        repr=False,
        description=(
            "Secret the encryption key of stored secrets and the webhook signing keys are derived from "
            f"(HKDF, one `info` per purpose); production needs at least {SECRET_KEY_MIN_BYTES} bytes."
        ),
    )
    secret_key_previous: str | None = Field(
        default=None,
        repr=False,
        description=(
            "During a rotation, the previous KILN_SECRET_KEY: stored secrets encrypted with it stay "
            "readable until `kiln secrets reencrypt` has rewritten them under the current key."
        ),
    )
    log_level: str = Field(default="INFO", description="Log level.")
    log_json: bool = Field(default=False, description="JSON logs (else readable console lines).")
    database: DatabaseSettings = DatabaseSettings()
    redis: RedisSettings = RedisSettings()
    storage: StorageSettings = StorageSettings()
    images: ImageSettings = ImageSettings()
    server: ServerSettings = ServerSettings()
    limits: LimitSettings = LimitSettings()
    generation: GenerationSettings = GenerationSettings()
    providers: ProviderSettings = ProviderSettings()
    worker: WorkerSettings = WorkerSettings()
    stats: StatsSettings = StatsSettings()
    network: NetworkSettings = NetworkSettings()
    webhooks: WebhookSettings = WebhookSettings()
    dashboard: DashboardSettings = DashboardSettings()
    metrics: MetricsSettings = MetricsSettings()
    enhancer: EnhancerSettings = EnhancerSettings()
    compat: CompatSettings = CompatSettings()
    embedded: EmbeddedSettings = EmbeddedSettings()

    @model_validator(mode="after")
    def _network_defaults_for_mode(self) -> Settings:
        # Production reaches only public addresses unless the operator says otherwise; embedded mode
        # keeps a local ComfyUI/A1111 working out of the box. An explicit setting always wins.
        open_by_default = self.mode == "embedded"
        unset = {
            name: open_by_default
            for name in ("allow_private", "allow_loopback")
            if getattr(self.network, name) is None
        }
        if unset:
            self.network = self.network.model_copy(update=unset)
        return self

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> Settings:
        if self.mode == "production" and self.secret_key == DEFAULT_SECRET_KEY:
            raise ValueError("KILN_SECRET_KEY must be set to a real secret when KILN_MODE=production")
        if self.mode == "production" and len(self.secret_key.encode()) < SECRET_KEY_MIN_BYTES:
            raise ValueError(
                f"KILN_SECRET_KEY must be at least {SECRET_KEY_MIN_BYTES} bytes when KILN_MODE=production "
                "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
            )
        return self

    @property
    def secret_keys(self) -> tuple[str, ...]:
        """The keys stored secrets are read with: the current one first (it also encrypts)."""
        previous = self.secret_key_previous
        return (self.secret_key, previous) if previous and previous != self.secret_key else (self.secret_key,)

    @property
    def broker_url(self) -> str:
        url = self.redis.broker_url or self.redis.url
        if not url:
            raise RuntimeError("no broker: set KILN_REDIS_URL (or run `kiln dev` for the embedded one)")
        return url

    @property
    def database_url(self) -> str:
        if not self.database.url:
            raise RuntimeError("no database: set KILN_DATABASE_URL (or run `kiln dev` for the embedded one)")
        return self.database.url

    @property
    def redis_url(self) -> str:
        if not self.redis.url:
            raise RuntimeError("no Redis: set KILN_REDIS_URL (or run `kiln dev` for the embedded one)")
        return self.redis.url


@lru_cache
def get_settings() -> Settings:
    return Settings()
