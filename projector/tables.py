"""The read model's tables (SQLAlchemy Core), identical on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Date,
    DateTime,
    Dialect,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out, on every backend.

    SQLite has no time zones: SQLAlchemy stores the wall-clock digits and hands back naive
    values. Storing UTC and re-attaching it on the way out makes both backends round-trip the
    same aware value, so a live projection compares equal to a rebuild on either.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        # A naive timestamp from a careless producer is taken as UTC rather than crashing the projector.
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# JSONB on PostgreSQL so params can be indexed and queried later; JSON text on SQLite.
_json = JSON().with_variant(JSONB(), "postgresql")

metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("owner", String(128), nullable=False, index=True),
    Column("status", String(16), nullable=False),
    Column("backend", String(64), nullable=False),
    Column("dialect", String(32), nullable=False),
    Column("params", _json, nullable=False),
    # Denormalised out of params so a later search/listing can filter without parsing JSON.
    Column("prompt", Text, nullable=False),
    Column("model", String(256), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime, nullable=True),
    Column("completed_at", UTCDateTime, nullable=True),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("step", Integer, nullable=False),
    Column("total_steps", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("error", Text, nullable=True),
    Column("last_event_at", UTCDateTime, nullable=False),
    # The queue: a backend's pending jobs in the order workers take them. Queue positions (SSE,
    # CyberImage's status) count along it, so they cost what is queued, not the whole history.
    Index("jobs_queue", "status", "backend", "created_at", "id"),
)

images = Table(
    "images",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("job_id", String(64), nullable=False, index=True),
    Column("owner", String(128), nullable=False, index=True),
    Column("index", Integer, nullable=False),
    Column("object_key", String(1024), nullable=False),
    Column("content_type", String(128), nullable=False),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    # Seeds routinely exceed 32 bits.
    Column("seed", BigInteger, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("state", String(16), nullable=False),
)

# The latest quota each outside service reported (UpstreamQuotaObserved), by source.
upstream_quotas = Table(
    "upstream_quotas",
    metadata,
    Column("source", String(256), primary_key=True),
    Column("backend", String(64), nullable=False),
    Column("used", BigInteger, nullable=True),
    Column("quota_limit", BigInteger, nullable=True),
    Column("remaining", BigInteger, nullable=True),
    Column("resets_at", UTCDateTime, nullable=True),
    Column("observed_at", UTCDateTime, nullable=False),
)

# Per-owner usage, so the quota check on every submit reads a row or two instead of scanning the
# owner's history. A projection of the jobs rows like any other, kept in the transaction that
# writes them (projector.usage): jobs pending or processing per owner...
owner_usage = Table(
    "owner_usage",
    metadata,
    Column("owner", String(128), primary_key=True),
    Column("active_jobs", BigInteger, nullable=False),
)

# ...and the images asked for (num_images) by the jobs created on each UTC day.
owner_daily_images = Table(
    "owner_daily_images",
    metadata,
    Column("owner", String(128), primary_key=True),
    Column("day", Date, primary_key=True),
    Column("images", BigInteger, nullable=False),
)

# One row per projector name: the log position its rows reflect, written in the same transaction.
projector_positions = Table(
    "projector_positions",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("position", BigInteger, nullable=False),
)

# The tables a rebuild drops and replays: derived from the log.
READ_MODEL_TABLES: tuple[Table, ...] = (
    jobs,
    images,
    upstream_quotas,
    owner_usage,
    owner_daily_images,
    projector_positions,
)

# --- Not derived from the log (a rebuild leaves them alone): the ingress's own shared state. ---

# API keys made with `imagebus keys create`: only an HMAC of the key (under the server secret) is
# kept; the key itself is shown once. ``id`` is the public part embedded in the key.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("key_hash", String(128), nullable=False),
    Column("role", String(16), nullable=False),
    # Per-key quotas; NULL: the ingress's defaults.
    Column("daily_images", Integer, nullable=True),
    Column("active_jobs", Integer, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
)

# Fixed-window request counters shared by every ingress replica: one row per limited subject
# ("key:<owner>", "ip:<address>"), its current window and the requests counted in it.
rate_limit_counters = Table(
    "rate_limit_counters",
    metadata,
    Column("bucket", String(200), primary_key=True),
    Column("window_start", BigInteger, nullable=False),
    Column("count", Integer, nullable=False),
)
