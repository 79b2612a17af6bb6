"""What the ingress reads (jobs and their images, per owner), plus its read-your-writes insert."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import date, datetime
from typing import Any

from sqlalchemy import Connection, RowMapping, Text, and_, bindparam, cast, func, literal, select

from projector.apply import ImageRow, ImageState, queued_row
from projector.database import Database
from projector.queries import (
    USAGE,
    GalleryRecord,
    QueueFigures,
    StalledJob,
    UpstreamQuota,
    Usage,
    mark_image_deleted,
    select_gallery,
    select_queue_figures,
    select_stalled,
    select_upstream_quotas,
    usage_from_row,
)
from projector.tables import images, jobs
from projector.usage import insert_jobs
from schemas import GenerationParams, JobQueued, JobStatus

# Statements built once: building one (and its cache key) per call costs more than SQLite running it.
_PING = select(literal(1))


# The read side hands out the projector's own image rows (state is an ImageState, a str enum).
ImageRecord = ImageRow


@dataclass(frozen=True)
class JobRecord:
    id: str
    owner: str
    status: JobStatus
    backend: str
    dialect: str
    params: GenerationParams
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    updated_at: datetime
    step: int
    total_steps: int
    attempt: int
    error: str | None
    images: tuple[ImageRecord, ...]


# A job and its live images in one statement (one snapshot, one round trip): one row per image, or
# one row of NULL image columns for a job without any.
# Only the columns a JobRecord holds: each one selected is one more value to convert.
_JOB_NAMES = tuple(f.name for f in fields(JobRecord) if f.name != "images")
_IMAGE_NAMES = tuple(f.name for f in fields(ImageRow))
_JOB_COLUMNS = len(_JOB_NAMES)
_JOB_WITH_IMAGES = (
    select(
        # params as its JSON text, parsed (once per distinct text) by _params.
        *(jobs.c[name] if name != "params" else cast(jobs.c.params, Text).label("params") for name in _JOB_NAMES),
        *(images.c[name] for name in _IMAGE_NAMES),
    )
    .select_from(jobs.outerjoin(images, and_(images.c.job_id == jobs.c.id, images.c.state != ImageState.DELETED.value)))
    .where(jobs.c.id == bindparam("job_id"))
    # No ORDER BY: SQLite would sort a job's few images in a temporary b-tree; get_job sorts them.
)
_OWNED_JOB_WITH_IMAGES = _JOB_WITH_IMAGES.where(jobs.c.owner == bindparam("owner"))
_LIVE_IMAGE = select(*(images.c[name] for name in _IMAGE_NAMES)).where(
    images.c.id == bindparam("image_id"), images.c.state != ImageState.DELETED.value
)
_OWNED_LIVE_IMAGE = _LIVE_IMAGE.where(images.c.owner == bindparam("owner"))


class ReadModel:
    """Owner-scoped queries over the projected read model.

    ``owner=None`` is the admin view (any owner); otherwise a row of another owner reads as absent,
    so the API answers 404 rather than revealing that the id exists.
    """

    def __init__(self, database: Database) -> None:
        self._database = database

    async def ping(self) -> None:
        """One round trip to the database (readiness)."""
        await self._database.read(lambda conn: conn.execute(_PING).scalar_one())

    async def get_job(self, job_id: str, owner: str | None) -> JobRecord | None:
        """The job with its images (by index, deleted ones left out), or None."""
        if owner is None:
            rows = await self._database.point_read(_JOB_WITH_IMAGES, {"job_id": job_id})
        else:
            rows = await self._database.point_read(_OWNED_JOB_WITH_IMAGES, {"job_id": job_id, "owner": owner})
        if not rows:
            return None
        job = dict(zip(_JOB_NAMES, rows[0][:_JOB_COLUMNS], strict=True))
        image_rows = sorted(
            (dict(zip(_IMAGE_NAMES, row[_JOB_COLUMNS:], strict=True)) for row in rows if row[_JOB_COLUMNS] is not None),
            key=lambda image: image["index"],
        )
        return _job_record(job, image_rows, _params(job["params"]))

    async def get_image(self, image_id: str, owner: str | None) -> ImageRecord | None:
        """The image (available or expired), or None when absent, deleted or another owner's."""
        if owner is None:
            rows = await self._database.point_read(_LIVE_IMAGE, {"image_id": image_id})
        else:
            rows = await self._database.point_read(_OWNED_LIVE_IMAGE, {"image_id": image_id, "owner": owner})
        return _image_record(dict(zip(_IMAGE_NAMES, rows[0], strict=True))) if rows else None

    async def list_jobs(
        self, owner: str, *, status: JobStatus | None = None, offset: int = 0, limit: int = 20
    ) -> tuple[list[JobRecord], int]:
        """The owner's jobs, newest first, one page of them, and how many there are in all."""
        return await self._database.read(lambda conn: _select_jobs(conn, owner, status, offset, limit))

    async def queue_position(self, job: JobRecord) -> int:
        """How many jobs of the same backend wait ahead of ``job`` (0: next to be taken): a count
        along the queue's index, as long as the queue (at most the ingress's queue bound)."""
        params = {"backend": job.backend, "created_at": job.created_at, "id": job.id}
        rows = await self._database.point_read(_AHEAD, params)
        return int(rows[0][0])

    async def stream_states(self, job_ids: Sequence[str]) -> dict[str, tuple[JobStatus, int | None]]:
        """Each existing job's status and, while pending, its ``queue_position``: one query for
        all the jobs an ingress process streams."""
        return await self._database.read(lambda conn: _select_stream_states(conn, job_ids))

    async def gallery(
        self, owner: str, now: datetime, *, search: str | None, model: str | None, offset: int, limit: int
    ) -> tuple[list[GalleryRecord], int]:
        """The owner's fetchable images, newest first, filtered by a search over prompt and model."""
        return await self._database.read(
            lambda conn: select_gallery(conn, owner, now, search=search, model=model, offset=offset, limit=limit)
        )

    async def queue_figures(self, since: datetime) -> QueueFigures:
        return await self._database.read(lambda conn: select_queue_figures(conn, since))

    async def stalled_jobs(self, quiet_since: datetime) -> list[StalledJob]:
        return await self._database.read(lambda conn: select_stalled(conn, quiet_since))

    async def usage(self, owner: str, since: date) -> Usage:
        """The owner's jobs in flight and images asked for since UTC day ``since`` (two counter rows)."""
        rows = await self._database.point_read(USAGE, {"owner": owner, "since": since})
        return usage_from_row(rows[0])

    async def upstream_quotas(self) -> list[UpstreamQuota]:
        return await self._database.read(select_upstream_quotas)

    async def mark_image_deleted(self, image_id: str, owner: str) -> bool:
        """Hide the image now (read-your-writes for DELETE); the ImageDeleted event does the same."""
        return await self._database.write(lambda conn: mark_image_deleted(conn, image_id, owner))

    async def record_queued(self, event: JobQueued) -> bool:
        """Write the row the projector will write for ``event``, unless it is already there; True
        when the job's row is this event's (so this submit created the job).

        Called by the ingress right after publishing, so a read right after 202 never 404s.
        Insert-if-absent: if the projector got there first (and maybe moved the job on), its
        row stands. The projector's position is not touched; it applies the event as usual.
        Two submits of one client-chosen job id both publish a JobQueued; the row's created_at
        (the first event to land, by the ingress or the projector) names the one that won.
        """
        row = queued_row(event)

        def insert(conn: Connection) -> bool:
            # The projector's own insert, which also counts the job in the owner's usage.
            if insert_jobs(conn, [row]):
                return True
            created = conn.execute(select(jobs.c.created_at).where(jobs.c.id == event.job_id)).scalar_one()
            return bool(created == row.created_at)

        return await self._database.write(insert)


def _select_jobs(
    conn: Connection, owner: str, status: JobStatus | None, offset: int, limit: int
) -> tuple[list[JobRecord], int]:
    condition = jobs.c.owner == owner
    if status is not None:
        condition = condition & (jobs.c.status == status.value)
    total = conn.execute(select(func.count()).select_from(jobs).where(condition)).scalar_one()
    page = (
        conn.execute(
            select(jobs).where(condition).order_by(jobs.c.created_at.desc(), jobs.c.id).offset(offset).limit(limit)
        )
        .mappings()
        .all()
    )
    image_rows: dict[str, list[RowMapping]] = {row["id"]: [] for row in page}
    if page:
        live = (
            select(images)
            .where(images.c.job_id.in_(list(image_rows)), images.c.state != ImageState.DELETED.value)
            .order_by(images.c["index"])
        )
        for image in conn.execute(live).mappings():
            image_rows[image["job_id"]].append(image)
    return [_job_record(row, image_rows[row["id"]]) for row in page], int(total)


# The jobs of a backend that wait ahead of one (the order _PENDING_RANKS numbers them in).
_AHEAD = (
    select(func.count())
    .select_from(jobs)
    .where(
        jobs.c.status == JobStatus.PENDING.value,
        jobs.c.backend == bindparam("backend"),
        (jobs.c.created_at < bindparam("created_at"))
        | ((jobs.c.created_at == bindparam("created_at")) & (jobs.c.id < bindparam("id"))),
    )
)


# Every pending job numbered within its backend, oldest first (the order _AHEAD counts in).
_PENDING_RANKS = (
    select(
        jobs.c.id,
        (func.row_number().over(partition_by=jobs.c.backend, order_by=(jobs.c.created_at, jobs.c.id)) - 1).label(
            "position"
        ),
    )
    .where(jobs.c.status == JobStatus.PENDING.value)
    .subquery()
)
_STREAM_STATES = (
    select(jobs.c.id, jobs.c.status, _PENDING_RANKS.c.position)
    .select_from(jobs.outerjoin(_PENDING_RANKS, _PENDING_RANKS.c.id == jobs.c.id))
    .where(jobs.c.id.in_(bindparam("ids", expanding=True)))
)


def _select_stream_states(conn: Connection, job_ids: Sequence[str]) -> dict[str, tuple[JobStatus, int | None]]:
    rows = conn.execute(_STREAM_STATES, {"ids": list(job_ids)}) if job_ids else ()
    return {row.id: (JobStatus(row.status), row.position) for row in rows}


@functools.lru_cache(maxsize=4096)
def _params(text: str) -> GenerationParams:
    # A job's params never change, and the model is frozen: a status poll parses them once.
    return GenerationParams.model_validate_json(text)


def _job_record(
    row: Mapping[Any, Any], image_rows: Sequence[Mapping[Any, Any]], params: GenerationParams | None = None
) -> JobRecord:
    """``params``: the row's, already parsed (else validated from the row's decoded JSON)."""
    return JobRecord(
        id=row["id"],
        owner=row["owner"],
        status=JobStatus(row["status"]),
        backend=row["backend"],
        dialect=row["dialect"],
        params=GenerationParams.model_validate(row["params"]) if params is None else params,
        created_at=row["created_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        updated_at=row["updated_at"],
        step=row["step"],
        total_steps=row["total_steps"],
        attempt=row["attempt"],
        error=row["error"],
        images=tuple(_image_record(image) for image in image_rows),
    )


def _image_record(row: Mapping[Any, Any]) -> ImageRecord:
    # ImageRow.from_columns, less its dataclasses.fields() call per row.
    values = {name: row[name] for name in _IMAGE_NAMES}
    values["state"] = ImageState(values["state"])
    return ImageRow(**values)
