"""One settings class per role, each with its own env prefix.

Connection settings every role shares (bus, S3, database) are read from common
``IMAGEBUS_*`` names so one env file (``<data-dir>/env``) serves all roles. Settings are
built in ``main()`` and passed down; nothing else reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _common(name: str, default: Any, **constraints: Any) -> Any:
    return Field(default, validation_alias=AliasChoices(f"IMAGEBUS_{name}", name.lower()), **constraints)


class _RoleSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    log_format: str = Field("auto", validation_alias=AliasChoices("IMAGEBUS_LOG_FORMAT", "log_format"))
    log_level: str = Field("info", validation_alias=AliasChoices("IMAGEBUS_LOG_LEVEL", "log_level"))
    # Prometheus /metrics (and /health) of a role without an HTTP API of its own (workers,
    # projector, reaper); 0: not served. The ingress serves /metrics on its own port.
    metrics_host: str = _common("METRICS_HOST", "127.0.0.1")
    metrics_port: int = _common("METRICS_PORT", 0)
    # Traces: spans go to this OTLP/HTTP collector (e.g. http://otel-collector:4318) when set;
    # unset, trace ids are still made, carried in message headers and logged.
    otlp_endpoint: str | None = Field(
        None, validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT", "IMAGEBUS_OTLP_ENDPOINT", "otlp_endpoint")
    )
    # The service name on this role's spans (default imagebus-<role>).
    service_name: str | None = Field(None, validation_alias=AliasChoices("OTEL_SERVICE_NAME", "service_name"))
    # A file this role writes once it can take work (a worker: its models loaded and its bus and
    # store reached), so whoever started it knows when (`imagebus up` waits on it before its banner;
    # a supervisor or a startup probe can test for it too). Unset: nothing is written.
    ready_file: Path | None = Field(None, validation_alias=AliasChoices("IMAGEBUS_READY_FILE", "ready_file"))


class _BusMixin(BaseSettings):
    bus_url: str = _common("BUS_URL", "nats://127.0.0.1:4222")
    bus_namespace: str = _common("BUS_NAMESPACE", "imagebus")
    ack_wait_s: float = _common("ACK_WAIT_S", 30.0)
    max_deliveries: int = _common("MAX_DELIVERIES", 5)
    # How long the event log keeps events (the projector rebuilds from it; subscribers replay it).
    event_retention_s: float = _common("EVENT_RETENTION_S", 7 * 24 * 3600.0)
    # NATS: copies of each stream in a JetStream cluster (3 for a 3-server cluster); unset, streams
    # are created with 1 and an existing stream keeps its own.
    bus_replicas: int | None = _common("BUS_REPLICAS", None)


class _S3Mixin(BaseSettings):
    s3_endpoint: str = _common("S3_ENDPOINT", "127.0.0.1:9000")
    s3_public_endpoint: str | None = _common("S3_PUBLIC_ENDPOINT", None)
    s3_access_key: str = _common("S3_ACCESS_KEY", "imagebus")
    s3_secret_key: SecretStr = _common("S3_SECRET_KEY", SecretStr("imagebus-secret"))
    s3_bucket: str = _common("S3_BUCKET", "imagebus")
    s3_secure: bool = _common("S3_SECURE", False)
    s3_region: str = _common("S3_REGION", "us-east-1")
    image_ttl_s: float = _common("IMAGE_TTL_S", 600.0)


class _DatabaseMixin(BaseSettings):
    database_url: str = _common("DATABASE_URL", "sqlite:///.imagebus/readmodel.db")
    # PostgreSQL connections per handle: kept open, and more while busy. An ingress process holds
    # two handles (read model, rate-limit counters), the projector one; size max_connections to it.
    database_pool_size: int = _common("DATABASE_POOL_SIZE", 10, ge=1)
    database_pool_overflow: int = _common("DATABASE_POOL_OVERFLOW", 20, ge=0)


class _CatalogMixin(BaseSettings):
    # A JSON model catalog; the shipped default when unset.
    catalog_path: Path | None = _common("CATALOG", None)
    # A model id to make the default (e.g. "sd-turbo"), or a hub id / local folder to add as "custom".
    default_model: str | None = _common("MODEL", None)
    # A folder of LoRA .safetensors files (with optional <stem>.json sidecars and preview images),
    # added to the catalog's LoRAs; and/or "bucket/prefix" in the S3 store holding the same layout.
    lora_dir: Path | None = _common("LORA_DIR", None)
    lora_bucket: str | None = _common("LORA_BUCKET", None)


class IngressSettings(_RoleSettings, _BusMixin, _S3Mixin, _DatabaseMixin, _CatalogMixin):
    model_config = SettingsConfigDict(env_prefix="IMAGEBUS_INGRESS_", extra="ignore", populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = 8000
    # Comma-separated API keys accepted by the ingress (IMAGEBUS_API_KEYS or IMAGEBUS_API_KEY).
    api_keys: SecretStr = Field(
        SecretStr(""), validation_alias=AliasChoices("IMAGEBUS_API_KEYS", "IMAGEBUS_API_KEY", "api_keys")
    )
    # Server secret that keys the owner hash (so the read model never holds a usable key).
    key_secret: SecretStr = Field(
        SecretStr("imagebus-dev-secret"), validation_alias=AliasChoices("IMAGEBUS_KEY_SECRET", "key_secret")
    )
    max_body_bytes: int = 64 * 1024
    # Seconds a request body, or a request head from its first byte, may take to arrive.
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    # Event streams (SSE) open at once per process, and connections per process; beyond them, 503.
    max_streams: int = 5000
    max_connections: int = 10_000
    # Comma-separated keys that may also call admin routes (POST /api/reset_queue).
    admin_keys: SecretStr = Field(SecretStr(""), validation_alias=AliasChoices("IMAGEBUS_ADMIN_KEYS", "admin_keys"))
    # Keyless requests act as one shared "anonymous" owner (for seed clients that send no key).
    allow_anonymous: bool = False
    quota_active_jobs: int = 40
    quota_daily_images: int = 1500
    # Commands waiting in one queue before submits to it are refused with 429.
    max_queue_depth: int = 10_000
    # Requests per window per API key and per client address (0: off). Each replica refuses on its
    # own counts without I/O and shares what it admitted through the database at most every
    # rate_limit_sync_s, so every replica enforces nearly the same limit; the window must match.
    rate_limit_key: int = 600
    rate_limit_ip: int = 1200
    rate_limit_window_s: int = 60
    rate_limit_sync_s: float = Field(0.1, ge=0)
    # Proxies in front of the ingress appending to X-Forwarded-For (0: the header is ignored).
    trusted_proxy_hops: int = 0
    # A processing job with no event for this long is stalled (POST /api/reset_queue).
    stall_after_s: float = 600.0
    # An OpenAI-compatible endpoint (".../v1") for POST /api/enrich; templates when unset.
    enrich_url: str | None = None
    enrich_model: str = "gpt-4o-mini"
    enrich_api_key: SecretStr | None = None


class WorkerSettings(_RoleSettings, _BusMixin, _S3Mixin, _CatalogMixin):
    model_config = SettingsConfigDict(env_prefix="IMAGEBUS_WORKER_", extra="ignore", populate_by_name=True)

    backend: str = "diffusers"
    worker_id: str | None = None
    device: str | None = None
    dtype: str | None = None
    # Seconds a SIGTERM'd worker waits for its in-flight job before handing it back.
    shutdown_grace_s: float = 25.0
    # A running job's JobHeartbeat at most this often (the projector's stall watchdog listens).
    heartbeat_event_interval_s: float = 60.0
    preview_interval_s: float = 0.5
    # CPU threads for torch. Several CPU workers on one machine must share the cores: oversubscribed
    # OpenMP threads spin against each other and every worker slows down (`imagebus up` sets this).
    torch_threads: int | None = None
    # Models to load before taking work, so the first job does not pay for loading.
    preload: bool = True
    # The catalog pool this worker serves (its models only); unset: the backend's shared queue.
    pool: str | None = None
    # diffusers: memory for resident pipelines (GiB; unset: 80 % of the card, half the RAM on CPU),
    # a cap on their number, images per batched pipeline call (1: no dynamic batching), and CPU
    # offload of idle submodules for models bigger than the card.
    cache_budget_gb: float | None = None
    max_loaded_models: int | None = None
    max_batch_images: int = 4
    # The most a batch that is not full waits for batch-mates, and only while commands arrive less
    # than batch_burst_gap_s apart (a burst, published together, reaches the worker one by one); a
    # lone job on an idle worker starts at once. 0: never wait.
    batch_linger_s: float = Field(0.05, ge=0)
    batch_burst_gap_s: float = Field(0.01, gt=0)
    # How images made here (diffusers) are stored: png (lossless, fast zlib level by default), webp
    # or jpeg at image_quality (1-100). Encoded off the model's thread, beside the next batch.
    image_format: Literal["png", "webp", "jpeg"] = "png"
    image_quality: int = Field(90, ge=1, le=100)
    png_compress_level: int = Field(1, ge=0, le=9)
    cpu_offload: bool = False
    # Where LoRAs held in a bucket are cached on local disk.
    lora_cache_dir: Path | None = None
    # remote: API tokens by catalog endpoint id, as JSON ({"openai": "sk-..."}); jobs at once
    # (unset: the sum of the endpoints' concurrency caps).
    remote_tokens: dict[str, SecretStr] = Field(default_factory=dict)
    remote_concurrency: int | None = None
    # browser: the Chromium binary, pages (jobs) at once, site profiles (unset: the shipped ones),
    # signed-in session files (<site>.json, Playwright storage state), headless or not.
    browser_executable: str = "/usr/bin/chromium"
    browser_pages: int = 2
    sites_dir: Path | None = None
    storage_state_dir: Path | None = None
    headless: bool = True
    # Extra Chromium flags. (Playwright already launches Chromium with --no-sandbox: the container,
    # non-root with no capabilities, is the sandbox.)
    browser_args: list[str] = Field(
        default_factory=lambda: [
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ]
    )


class ProjectorSettings(_RoleSettings, _BusMixin, _DatabaseMixin):
    model_config = SettingsConfigDict(env_prefix="IMAGEBUS_PROJECTOR_", extra="ignore", populate_by_name=True)

    name: str = "projector"
    batch_size: int = 100
    # While events keep arriving less than batch_gap_s apart, a batch waits for more, at most
    # batch_wait_s in all: a trickle of events shares one transaction instead of one each, and
    # the read model lags by at most batch_wait_s. Only under load: a batch waits only while the
    # recent event rate promises company within the gap, so on a quiet stack events go in at once.
    batch_wait_s: float = Field(0.02, ge=0)
    batch_gap_s: float = Field(0.002, ge=0)
    # The stall watchdog beside it fails a processing job with no event (heartbeats included) for
    # this long; 0 turns it off. Keep it well above the workers' heartbeat event interval.
    stall_after_s: float = 600.0
    stall_check_interval_s: float = 30.0


class ReaperSettings(_RoleSettings, _BusMixin, _S3Mixin):
    model_config = SettingsConfigDict(env_prefix="IMAGEBUS_REAPER_", extra="ignore", populate_by_name=True)

    interval_s: float = 2.0


class KeysSettings(_RoleSettings, _DatabaseMixin):
    """``imagebus keys``: the database the ingress reads keys from, and the secret it hashes them with."""

    model_config = SettingsConfigDict(env_prefix="IMAGEBUS_KEYS_", extra="ignore", populate_by_name=True)

    # Must be the ingress's IMAGEBUS_KEY_SECRET, or the keys made here never match.
    key_secret: SecretStr = Field(
        SecretStr("imagebus-dev-secret"), validation_alias=AliasChoices("IMAGEBUS_KEY_SECRET", "key_secret")
    )


class LauncherSettings(_RoleSettings):
    """``imagebus up``: where the embedded stack keeps its data and what it starts."""

    model_config = SettingsConfigDict(env_prefix="IMAGEBUS_UP_", extra="ignore", populate_by_name=True)

    api_key: SecretStr | None = Field(None, validation_alias=AliasChoices("IMAGEBUS_API_KEY", "api_key"))
    default_model: str | None = Field(None, validation_alias=AliasChoices("IMAGEBUS_MODEL", "default_model"))
    # How long every role gets to say it is ready (a worker loads its default model first, which for
    # a hub model may mean a download) before `imagebus up` gives up.
    ready_timeout_s: float = Field(900.0, gt=0)
