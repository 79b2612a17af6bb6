"""The stall watchdog: fails processing jobs whose worker has gone silent.

A worker that stops (killed, frozen, partitioned) stops heartbeating its delivery, and the broker
re-runs the job elsewhere after its ack wait: the JobStarted of that new attempt keeps the job
alive here. What the broker will not re-run (deliveries used up, a command lost with a broker's
disk) would stay ``processing`` forever; a job with no event, heartbeat included, for
``stall_after_s`` is failed instead. Its JobFailed carries the job's one terminal message id, so a
worker that wakes up later and finishes it cannot add a second terminal event within the log's
de-duplication window (and the read model keeps the first one regardless).

It runs beside the projector, whose freshness it judges silence against: while the projector
lags (catching up after a restart) the read model is old, and old rows must not look stalled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime, timedelta

import structlog

from bus.base import Bus
from projector.readside import ReadModel
from schemas import JobFailed, terminal_message_id
from schemas.metrics import JOBS_STALLED

log = structlog.get_logger(__name__)


async def fail_stalled(bus: Bus, read_model: ReadModel, *, fresh_as_of: datetime, stall_after_s: float) -> list[str]:
    """Fail every processing job silent for ``stall_after_s`` before ``fresh_as_of``; their ids."""
    stalled = await read_model.stalled_jobs(fresh_as_of - timedelta(seconds=stall_after_s))
    for job in stalled:
        error = f"stalled: no sign of life from its worker for {stall_after_s:.0f} s"
        await bus.publish_event(JobFailed(job_id=job.id, error=error, message_id=terminal_message_id(job.id)))
        JOBS_STALLED.inc()
        log.warning("job_stalled", job_id=job.id, backend=job.backend, stall_after_s=stall_after_s)
    return [job.id for job in stalled]


async def run_stall_watchdog(
    bus: Bus,
    read_model: ReadModel,
    fresh_as_of: Callable[[], datetime | None],
    *,
    stall_after_s: float,
    interval_s: float,
    stop: asyncio.Event,
) -> None:
    """Check every ``interval_s`` until ``stop``; a failed check is logged and tried again."""
    log.info("stall_watchdog.started", stall_after_s=stall_after_s, interval_s=interval_s)
    while not stop.is_set():
        fresh = fresh_as_of()
        if fresh is not None:
            try:
                await fail_stalled(bus, read_model, fresh_as_of=fresh, stall_after_s=stall_after_s)
            except Exception as exc:
                log.warning("stall_watchdog.check_failed", error=repr(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
