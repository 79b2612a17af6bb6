"""What the ingress needs to run, built by the CLI from IngressSettings and passed in."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from bus import BusOptions
from schemas import Catalog
from storage.object_store import S3Config


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
    # Keys that may call admin routes (POST /api/reset_queue).
    admin_keys: tuple[str, ...] = ()
    # Requests without a key act as one shared "anonymous" owner, as the seed APIs without
    # keys (Chutes proxy, CyberImage) expect. A wrong key is still refused.
    allow_anonymous: bool = False
    quota: QuotaLimits = field(default_factory=QuotaLimits)
    # A processing job with no event for this long counts as stalled for reset_queue.
    stall_after_s: float = 600.0
    enrich: EnrichConfig = field(default_factory=EnrichConfig)
    # Preview images of scanned LoRAs by id: a file path or "s3://bucket/key" (GET /api/loras/{id}/image).
    lora_previews: Mapping[str, str] = field(default_factory=dict)
