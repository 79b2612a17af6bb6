"""What the ingress needs to run, built by the CLI from IngressSettings and passed in."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from bus import BusOptions
from schemas import Catalog
from storage.object_store import S3Config

# How long a replica trusts what it read about a database API key: a revoke reaches every
# replica within this time; shorter costs a database read per key and period.
KEY_CACHE_S = 5.0


@dataclass(frozen=True)
class QuotaLimits:
    """Per-key limits (the weights.gg seed's QUEUED_IMAGE_JOBS and DAILY_IMAGE_CREATIONS)."""

    # Jobs pending or processing at once.
    active_jobs: int = 40
    # Images asked for since midnight UTC.
    daily_images: int = 1500
    # Global: commands waiting in one queue (a backend's or a pool's). Beyond it submits get 429
    # instead of growing a backlog no one will wait for.
    max_queue_depth: int = 10_000


@dataclass(frozen=True)
class RateLimits:
    """Requests per fixed window, per API key and per client address, shared by every replica."""

    # 0 turns that limit off.
    requests_per_key: int = 600
    requests_per_ip: int = 1200
    # Every replica must use the same window: the counters they share are kept per window.
    window_s: int = 60
    # How stale a replica's view of the shared counts may be when it admits a request: the
    # counts it admitted are added, and the others' read, at most this often (0: every request).
    sync_interval_s: float = 0.1
    # Proxies in front of the ingress that append to X-Forwarded-For; the client address is the
    # entry this many from the right. 0: never trust the header (a client could write anything).
    trusted_proxy_hops: int = 0


@dataclass(frozen=True)
class EnrichConfig:
    """An OpenAI-compatible chat endpoint for /api/enrich; templates when unset or failing."""

    url: str | None = None
    model: str = "gpt-4o-mini"
    api_key: str | None = None
    timeout_s: float = 20.0


@dataclass(frozen=True)
class IngressConfig:
    bus_url: str
    bus_options: BusOptions
    s3: S3Config
    database_url: str
    catalog: Catalog
    api_keys: tuple[str, ...]
    key_secret: str
    max_body_bytes: int = 64 * 1024
    # uvicorn waits as long as a client takes: a request body must arrive within body_timeout_s,
    # a request head within header_timeout_s of its first byte (ingress/hardening.py).
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    # Event streams open at once in one process; beyond it stream requests get 503 + Retry-After.
    max_streams: int = 5000
    # Connections (or requests in flight) per process; beyond it uvicorn answers 503 at once.
    # Above max_streams, so a full set of streams still leaves room for ordinary requests.
    max_connections: int = 10_000
    # Keys that may call admin routes (POST /api/reset_queue).
    admin_keys: tuple[str, ...] = ()
    key_cache_s: float = KEY_CACHE_S
    # Requests without a key act as one shared "anonymous" owner, as the seed APIs without
    # keys (Chutes proxy, CyberImage) expect. A wrong key is still refused.
    allow_anonymous: bool = False
    quota: QuotaLimits = field(default_factory=QuotaLimits)
    rate_limits: RateLimits = field(default_factory=RateLimits)
    # PostgreSQL connections per database handle (projector/database.py); this process holds two.
    database_pool_size: int = 10
    database_pool_overflow: int = 20
    # A processing job with no event for this long counts as stalled for reset_queue.
    stall_after_s: float = 600.0
    # How often imagebus_queue_depth is read from the broker for every queue of the catalog.
    queue_depth_interval_s: float = 5.0
    enrich: EnrichConfig = field(default_factory=EnrichConfig)
    # Preview images of scanned LoRAs by id: a file path or "s3://bucket/key" (GET /api/loras/{id}/image).
    lora_previews: Mapping[str, str] = field(default_factory=dict)
