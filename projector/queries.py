"""Read-side queries beyond single jobs: the gallery, queue statistics, stalled jobs, usage.

Plain synchronous SQLAlchemy Core functions of a ``Connection`` (run by ``Database.read``),
identical on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import Connection, bindparam, func, or_, select, update

from projector.apply import ImageRow, ImageState
from projector.tables import images, jobs, owner_daily_images, owner_usage, upstream_quotas
from schemas import GenerationParams, JobStatus

# The average processing time is taken over this many of the latest completed jobs.
AVERAGE_OVER_JOBS = 1000


@dataclass(frozen=True)
class GalleryRecord:
    image: ImageRow
    params: GenerationParams


def select_gallery(
    conn: Connection,
    owner: str,
    now: datetime,
    *,
    search: str | None,
    model: str | None,
    offset: int,
    limit: int,
) -> tuple[list[GalleryRecord], int]:
    """The owner's images that can still be fetched, newest first, with the params of their job."""
    condition = (images.c.owner == owner) & (images.c.state == ImageState.AVAILABLE.value) & (images.c.expires_at > now)
    if model:
        condition = condition & (jobs.c.model == model)
    if search:
        pattern = "%" + search.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        condition = condition & or_(
            func.lower(jobs.c.prompt).like(pattern, escape="\\"), func.lower(jobs.c.model).like(pattern, escape="\\")
        )
    joined = images.join(jobs, jobs.c.id == images.c.job_id)
    total = conn.execute(select(func.count()).select_from(joined).where(condition)).scalar_one()
    rows = conn.execute(
        select(images, jobs.c.params.label("job_params"))
        .select_from(joined)
        .where(condition)
        .order_by(images.c.created_at.desc(), images.c.job_id, images.c["index"])
        .offset(offset)
        .limit(limit)
    ).mappings()
    records = [
        GalleryRecord(image=ImageRow.from_columns(row), params=GenerationParams.model_validate(row["job_params"]))
        for row in rows
    ]
    return records, int(total)


def mark_image_deleted(conn: Connection, image_id: str, owner: str) -> bool:
    """Hide the image at once (the projector applies the ImageDeleted event the same way later)."""
    result = conn.execute(
        update(images)
        .where(images.c.id == image_id, images.c.owner == owner, images.c.state != ImageState.DELETED.value)
        .values(state=ImageState.DELETED.value)
    )
    return bool(result.rowcount)


@dataclass(frozen=True)
class QueueFigures:
    by_status: dict[str, int]
    recent_by_status: dict[str, int]
    by_model: dict[str, dict[str, int]]
    avg_processing_s: float | None


def select_queue_figures(conn: Connection, since: datetime) -> QueueFigures:
    """Job counts over the whole read model, over the jobs created since ``since``, and per model."""
    by_status = {
        row.status: int(row.n)
        for row in conn.execute(select(jobs.c.status, func.count().label("n")).group_by(jobs.c.status))
    }
    recent = {
        row.status: int(row.n)
        for row in conn.execute(
            select(jobs.c.status, func.count().label("n")).where(jobs.c.created_at >= since).group_by(jobs.c.status)
        )
    }
    by_model: dict[str, dict[str, int]] = {}
    for row in conn.execute(
        select(jobs.c.model, jobs.c.status, func.count().label("n")).group_by(jobs.c.model, jobs.c.status)
    ):
        by_model.setdefault(row.model, {})[row.status] = int(row.n)
    # Durations in Python: date arithmetic differs between SQLite and PostgreSQL.
    spans = conn.execute(
        select(jobs.c.started_at, jobs.c.completed_at)
        .where(jobs.c.status == JobStatus.COMPLETED.value, jobs.c.started_at.is_not(None))
        .order_by(jobs.c.completed_at.desc())
        .limit(AVERAGE_OVER_JOBS)
    ).all()
    durations = [(done - started).total_seconds() for started, done in spans if done is not None]
    average = sum(durations) / len(durations) if durations else None
    return QueueFigures(by_status, recent, by_model, average)


@dataclass(frozen=True)
class StalledJob:
    id: str
    owner: str
    backend: str
    params: GenerationParams


def select_stalled(conn: Connection, quiet_since: datetime) -> list[StalledJob]:
    """Processing jobs that have sent no event (start, step, image) since ``quiet_since``."""
    rows = conn.execute(
        select(jobs.c.id, jobs.c.owner, jobs.c.backend, jobs.c.params).where(
            jobs.c.status == JobStatus.PROCESSING.value, jobs.c.last_event_at < quiet_since
        )
    ).mappings()
    return [
        StalledJob(row["id"], row["owner"], row["backend"], GenerationParams.model_validate(row["params"]))
        for row in rows
    ]


@dataclass(frozen=True)
class Usage:
    active_jobs: int
    images_since: int


# The counters the projector keeps (projector.usage): a row or two per submit, however long the
# owner's history. Built once: building a statement costs more than SQLite running it.
# One statement, so the ingress reads both as a point read (on SQLite, on the event loop).
USAGE = select(
    select(owner_usage.c.active_jobs).where(owner_usage.c.owner == bindparam("owner")).scalar_subquery(),
    select(func.coalesce(func.sum(owner_daily_images.c.images), 0))
    .where(owner_daily_images.c.owner == bindparam("owner"), owner_daily_images.c.day >= bindparam("since"))
    .scalar_subquery(),
)


def usage_from_row(row: Sequence[Any]) -> Usage:
    active, asked = row
    return Usage(int(active or 0), int(asked or 0))


def select_usage(conn: Connection, owner: str, since: date) -> Usage:
    """The owner's jobs in flight, and the images asked for in jobs created on UTC day ``since`` or later."""
    return usage_from_row(conn.execute(USAGE, {"owner": owner, "since": since}).one())


@dataclass(frozen=True)
class UpstreamQuota:
    source: str
    backend: str
    used: int | None
    limit: int | None
    remaining: int | None
    resets_at: datetime | None
    observed_at: datetime


def select_upstream_quotas(conn: Connection) -> list[UpstreamQuota]:
    rows = conn.execute(select(upstream_quotas).order_by(upstream_quotas.c.source)).mappings()
    return [
        UpstreamQuota(
            source=row["source"],
            backend=row["backend"],
            used=row["used"],
            limit=row["quota_limit"],
            remaining=row["remaining"],
            resets_at=row["resets_at"],
            observed_at=row["observed_at"],
        )
        for row in rows
    ]


def day_start(now: datetime) -> datetime:
    return now.replace(hour=0, minute=0, second=0, microsecond=0)
