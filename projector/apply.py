"""The projection rules: how each event changes the jobs and images it touches.

Pure functions of the events and the rows they touch: no clock, no I/O. That is what makes a
live projection equal to a rebuild from the log, and redelivery or replay harmless.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any, TypeVar

import structlog

from schemas import (
    Event,
    ImageDeleted,
    ImageExpired,
    ImageStored,
    JobCanceled,
    JobFailed,
    JobHeartbeat,
    JobProgress,
    JobQueued,
    JobRequeued,
    JobStarted,
    JobStatus,
    JobSucceeded,
    Message,
    UpstreamQuotaObserved,
)

log = structlog.get_logger(__name__)

_E = TypeVar("_E", bound=Message)


class ImageState(StrEnum):
    AVAILABLE = "available"
    EXPIRED = "expired"
    DELETED = "deleted"


@dataclass(frozen=True)
class JobRow:
    """One row of ``tables.jobs``, field for column."""

    id: str
    owner: str
    status: JobStatus
    backend: str
    dialect: str
    params: dict[str, Any]
    prompt: str
    model: str
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    updated_at: datetime
    step: int
    total_steps: int
    attempt: int
    error: str | None
    last_event_at: datetime

    @classmethod
    def from_columns(cls, columns: Mapping[Any, Any]) -> JobRow:
        values = {f.name: columns[f.name] for f in fields(cls)}
        return cls(**{**values, "status": JobStatus(values["status"])})

    def to_columns(self) -> dict[str, Any]:
        # Shallow (asdict would deep-copy params on every write): the row is immutable and
        # nothing mutates the columns on their way into SQL.
        return {**vars(self), "status": self.status.value}


@dataclass(frozen=True)
class ImageRow:
    """One row of ``tables.images``, field for column."""

    id: str
    job_id: str
    owner: str
    index: int
    object_key: str
    content_type: str
    width: int
    height: int
    size_bytes: int
    seed: int | None
    created_at: datetime
    expires_at: datetime
    state: ImageState

    @classmethod
    def from_columns(cls, columns: Mapping[Any, Any]) -> ImageRow:
        values = {f.name: columns[f.name] for f in fields(cls)}
        return cls(**{**values, "state": ImageState(values["state"])})

    def to_columns(self) -> dict[str, Any]:
        return {**vars(self), "state": self.state.value}


@dataclass
class Projection:
    """The rows a batch of events touches: loaded once, folded in memory, written back once.

    Only rows that actually changed are marked, so re-applying a batch writes nothing.
    """

    jobs: dict[str, JobRow] = field(default_factory=dict)
    images: dict[str, ImageRow] = field(default_factory=dict)
    changed_jobs: set[str] = field(default_factory=set)
    changed_images: set[str] = field(default_factory=set)
    # Latest UpstreamQuotaObserved per source in the batch (the log is ordered: last wins).
    quotas: dict[str, UpstreamQuotaObserved] = field(default_factory=dict)

    def put_job(self, row: JobRow) -> None:
        if self.jobs.get(row.id) != row:
            self.jobs[row.id] = row
            self.changed_jobs.add(row.id)

    def put_image(self, row: ImageRow) -> None:
        if self.images.get(row.id) != row:
            self.images[row.id] = row
            self.changed_images.add(row.id)


@dataclass
class UsageChanges:
    """What a set of row changes does to the per-owner usage counters (``tables.owner_usage``,
    ``tables.owner_daily_images``).

    Derived from rows, not events: a row that did not change counts nothing, so a redelivered
    or replayed event cannot count twice, and the counters always equal a count over the rows.
    """

    active_jobs: Counter[str] = field(default_factory=Counter)
    daily_images: Counter[tuple[str, date]] = field(default_factory=Counter)

    def count(self, before: JobRow | None, after: JobRow | None) -> None:
        """Add the change from ``before`` to ``after`` (None: no row) of one job."""
        for row, sign in ((before, -1), (after, 1)):
            if row is None:
                continue
            if not row.status.is_terminal():
                self.active_jobs[row.owner] += sign
            # The day of the UTC midnight the quota counts from; params as the old SQL sum read them.
            day = row.created_at.astimezone(UTC).date()
            self.daily_images[(row.owner, day)] += sign * int(row.params.get("num_images") or 0)

    def nonzero(self) -> tuple[dict[str, int], dict[tuple[str, date], int]]:
        """The counts that moved, by owner and by (owner, day)."""
        return (
            {owner: n for owner, n in self.active_jobs.items() if n},
            {key: n for key, n in self.daily_images.items() if n},
        )


def queued_row(event: JobQueued) -> JobRow:
    """The row a JobQueued creates; also what the ingress writes for read-your-writes."""
    event = _aware(event)
    return JobRow(
        id=event.job_id,
        owner=event.owner,
        status=JobStatus.PENDING,
        backend=event.backend,
        dialect=event.dialect,
        params=event.params.model_dump(mode="json"),
        prompt=event.params.prompt,
        model=event.params.model,
        created_at=event.occurred_at,
        started_at=None,
        completed_at=None,
        updated_at=event.occurred_at,
        step=0,
        total_steps=event.params.num_inference_steps,
        attempt=0,
        error=None,
        last_event_at=event.occurred_at,
    )


def stored_row(event: ImageStored, owner: str) -> ImageRow:
    """The row an ImageStored creates; also what the gallery stream shows before the projector runs."""
    return ImageRow(
        id=event.image_id,
        job_id=event.job_id,
        owner=owner,
        index=event.index,
        object_key=event.object_key,
        content_type=event.content_type,
        width=event.width,
        height=event.height,
        size_bytes=event.size_bytes,
        seed=event.seed,
        created_at=event.occurred_at,
        expires_at=event.expires_at,
        state=ImageState.AVAILABLE,
    )


def apply_event(projection: Projection, event: Event) -> None:
    """Fold one event into the rows it touches. Idempotent: applying it twice equals once."""
    event = _aware(event)
    if isinstance(event, UpstreamQuotaObserved):
        projection.quotas[event.source] = event
        return  # about the outside service, not the job it followed
    if isinstance(event, JobQueued) and event.job_id not in projection.jobs:
        projection.put_job(queued_row(event))
    job = projection.jobs.get(event.job_id)
    if job is None:
        # Nothing to attach it to (its JobQueued is older than the log's retention, or it is junk).
        log.warning("event for unknown job ignored", job_id=event.job_id, event_type=event.type)
        return
    match event:
        case JobStarted():
            job = _started(job, event)
        case JobRequeued():
            job = _requeued(job)
        case JobProgress():
            job = _progressed(job, event)
        case JobSucceeded() | JobFailed() | JobCanceled():
            job = _finished(job, event)
        case ImageStored():
            _store_image(projection, job, event)
        case ImageExpired():
            _expire_image(projection, event)
        case ImageDeleted():
            _delete_image(projection, event)
        case JobQueued():
            pass  # inserted above if absent; a second JobQueued for a known job changes nothing
        case JobHeartbeat():
            pass  # only moves last_event_at (below): the stall watchdog's sign of life
    projection.put_job(_touched(job, event.occurred_at))


def _aware(event: _E) -> _E:
    # A naive timestamp from a careless producer is read as UTC; comparing it with the aware
    # ones already stored would otherwise raise and stop the projector.
    naive = {
        name: value.replace(tzinfo=UTC)
        for name in ("occurred_at", "expires_at")
        if isinstance(value := getattr(event, name, None), datetime) and value.tzinfo is None
    }
    return event.model_copy(update=naive) if naive else event


def _advance(current: JobStatus, wanted: JobStatus) -> JobStatus:
    # A job never moves back (e.g. a late JobStarted must not reopen it).
    return wanted if wanted.rank >= current.rank else current


def _started(job: JobRow, event: JobStarted) -> JobRow:
    if job.status.is_terminal():
        return job
    restarted = event.attempt > job.attempt
    return replace(
        job,
        status=_advance(job.status, JobStatus.PROCESSING),
        started_at=job.started_at or event.occurred_at,
        attempt=max(job.attempt, event.attempt),
        # A redelivered job starts its steps over; a duplicate JobStarted keeps the progress.
        step=0 if restarted else job.step,
    )


def _requeued(job: JobRow) -> JobRow:
    # The one move back: a stalled job is pending again. Its re-published command is a new
    # message whose deliveries count from 1, so the attempt counter starts over too.
    if job.status.is_terminal():
        return job
    return replace(job, status=JobStatus.PENDING, step=0, attempt=0)


def _progressed(job: JobRow, event: JobProgress) -> JobRow:
    # A late duplicate from an earlier attempt must not show that attempt's step.
    if job.status.is_terminal() or event.attempt < job.attempt:
        return job
    return replace(
        job,
        status=_advance(job.status, JobStatus.PROCESSING),
        step=event.step,
        total_steps=event.total_steps,
    )


def _finished(job: JobRow, event: JobSucceeded | JobFailed | JobCanceled) -> JobRow:
    if job.status.is_terminal():
        return job  # exactly one terminal state: the first one wins
    match event:
        case JobSucceeded():
            return replace(
                job,
                status=JobStatus.COMPLETED,
                completed_at=event.occurred_at,
                step=job.total_steps,
                error=None,
            )
        case JobFailed():
            return replace(job, status=JobStatus.FAILED, completed_at=event.occurred_at, error=event.error)
        case JobCanceled():
            return replace(job, status=JobStatus.CANCELED, completed_at=event.occurred_at, error=event.reason)


def _store_image(projection: Projection, job: JobRow, event: ImageStored) -> None:
    if job.status.is_terminal():
        return
    current = projection.images.get(event.image_id)
    if current is not None and current.object_key == event.object_key:
        # The same object stored again (redelivered event): keep its state, which may already
        # be expired or deleted, rather than resurrect an object that is gone.
        return
    # New, or rewritten by a redelivered job under a new object key: the latest wins.
    projection.put_image(stored_row(event, job.owner))


def _expire_image(projection: Projection, event: ImageExpired) -> None:
    image = _image_of_job(projection, event.image_id, event.job_id)
    # An orphan object from an earlier attempt expiring must not expire the current image,
    # and a deleted image stays deleted.
    if image is not None and image.object_key == event.object_key and image.state is ImageState.AVAILABLE:
        projection.put_image(replace(image, state=ImageState.EXPIRED))


def _delete_image(projection: Projection, event: ImageDeleted) -> None:
    image = _image_of_job(projection, event.image_id, event.job_id)
    if image is not None:
        projection.put_image(replace(image, state=ImageState.DELETED))


def _image_of_job(projection: Projection, image_id: str, job_id: str) -> ImageRow | None:
    image = projection.images.get(image_id)
    if image is None or image.job_id != job_id:
        log.info("event for unknown image ignored", job_id=job_id, image_id=image_id)
        return None
    return image


def _touched(job: JobRow, occurred_at: datetime) -> JobRow:
    # max, not assignment: a replayed or late event never moves the clock of a job backwards.
    return replace(
        job,
        updated_at=max(job.updated_at, occurred_at),
        last_event_at=max(job.last_event_at, occurred_at),
    )
