"""Queue statistics (``GET /api/queue``) and putting stalled jobs back (``POST /api/reset_queue``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import structlog

from bus import Bus
from projector.readside import ReadModel
from schemas import Catalog, GenerateImage, JobRequeued, JobStatus, new_id
from schemas.api import QueueStats, ResetResult, StatusCounts

log = structlog.get_logger(__name__)


def _counts(by_status: dict[str, int]) -> StatusCounts:
    known = {status.value: by_status.get(status.value, 0) for status in JobStatus}
    return StatusCounts(**known, total=sum(by_status.values()))


async def queue_stats(read_model: ReadModel, *, detailed: bool) -> QueueStats:
    now = datetime.now(UTC)
    figures = await read_model.queue_figures(since=now - timedelta(hours=24))
    overall = _counts(figures.by_status)
    stats = QueueStats(**overall.model_dump(), queue_size=overall.pending)
    if not detailed:
        return stats
    recent = _counts(figures.recent_by_status)
    finished = recent.completed + recent.failed
    return stats.model_copy(
        update={
            "recent_24h": recent,
            "avg_processing_time_seconds": (
                None if figures.avg_processing_s is None else round(figures.avg_processing_s, 2)
            ),
            "models": {model: _counts(counts) for model, counts in sorted(figures.by_model.items())},
            "failure_rate": round(100.0 * recent.failed / finished, 2) if finished else 0.0,
        }
    )


async def reset_stalled(bus: Bus, read_model: ReadModel, catalog: Catalog, *, stall_after_s: float) -> ResetResult:
    """Every processing job quiet for ``stall_after_s``: pending again, its command published anew.

    The event goes first, so the read model shows the job pending before a worker can start it.
    A stalled worker that wakes up later only races the new attempt; the first terminal event wins.
    """
    stalled = await read_model.stalled_jobs(datetime.now(UTC) - timedelta(seconds=stall_after_s))
    for job in stalled:
        reason = f"no progress for {stall_after_s:.0f} s; reset by an admin"
        await bus.publish_event(JobRequeued(job_id=job.id, reason=reason))
        spec = catalog.models.get(job.params.model)
        # A new message id: the original id may still sit in the bus's de-duplication window.
        await bus.publish_command(
            GenerateImage(
                job_id=job.id,
                message_id=new_id(),
                owner=job.owner,
                backend=job.backend,
                pool=spec.pool if spec is not None else None,
                params=job.params,
            )
        )
        log.info("job_requeued", job_id=job.id)
    count = len(stalled)
    return ResetResult(reset_count=count, message=f"Reset {count} stalled jobs to pending status")
