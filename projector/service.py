"""The projector: reads the durable event log and folds it into the read model.

Each batch of events and the new log position are written in one transaction, so a crash at
any point leaves rows and position consistent and the projector resumes exactly where its
rows end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from bus.base import Bus, LoggedEvent
from bus.tracing import trace_context, trace_id_of, tracer
from projector.apply import ImageRow, JobRow, Projection, apply_event
from projector.arrivals import RecentArrivals
from projector.database import Database, reset_schema, upsert
from projector.tables import images, jobs, projector_positions, upstream_quotas
from projector.usage import write_jobs
from schemas import Event, ImageDeleted, ImageExpired, ImageStored, JobStatus, UpstreamQuotaObserved
from schemas.metrics import JOBS

log = structlog.get_logger(__name__)

# While events keep arriving less than the gap apart, a batch waits for more, at most the wait in
# all (IMAGEBUS_PROJECTOR_BATCH_GAP_S, _BATCH_WAIT_S): under a trickle of events tens of them share
# one transaction, and the read model lags by at most the wait. It waits only while events arrive
# fast enough for the gap to be likely to bring one (projector.arrivals); on a quiet stack, events
# are written as they come.
DEFAULT_BATCH_WAIT_S = 0.02
DEFAULT_BATCH_GAP_S = 0.002
# Wait for company when the recent rate promises at least this many events within a gap.
_COMPANY_EXPECTED = 0.5

# Statements built once: building one (and its cache key) per call costs more than SQLite running it.
_JOBS_BY_ID = select(jobs).where(jobs.c.id.in_(bindparam("ids", expanding=True)))
_IMAGES_BY_ID = select(images).where(images.c.id.in_(bindparam("ids", expanding=True)))
_POSITION = select(projector_positions.c.position).where(projector_positions.c.name == bindparam("projector"))
_FIRST_POSITION = insert(projector_positions)
_NEXT_POSITION = (
    update(projector_positions)
    .where(projector_positions.c.name == bindparam("projector"), projector_positions.c.position == bindparam("old"))
    .values(position=bindparam("new"))
)


class ProjectorConflict(RuntimeError):
    """Another projector with the same name moved the position: two must never run at once."""


@dataclass(frozen=True)
class _EndOfLog:
    error: BaseException | None = None


class Projector:
    """Applies the event log to the read model, batch by batch, resuming where it left off."""

    def __init__(
        self,
        database: Database,
        bus: Bus,
        *,
        name: str = "projector",
        batch_size: int = 100,
        batch_wait_s: float = DEFAULT_BATCH_WAIT_S,
        batch_gap_s: float = DEFAULT_BATCH_GAP_S,
        spans: bool = True,
        caught_up_after_s: float = 1.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if batch_wait_s < 0 or batch_gap_s < 0:
            raise ValueError("batch_wait_s and batch_gap_s must not be negative")
        self._database = database
        self._bus = bus
        self._name = name
        self._batch_size = batch_size
        self._batch_wait_s = batch_wait_s
        self._batch_gap_s = batch_gap_s
        # Spans of projected jobs: worth making only where an exporter sends them somewhere.
        self._spans = spans
        # Waiting this long on an empty log means it has caught up (catching up after a restart, it
        # waits only milliseconds between fetches).
        self._caught_up_after_s = caught_up_after_s
        # Loop time since which it has been waiting on an empty log (None: it is not waiting).
        self._waiting_since: float | None = None
        # occurred_at of the newest event applied.
        self._applied_through: datetime | None = None
        self._arrivals = RecentArrivals(batch_wait_s)

    def fresh_as_of(self) -> datetime | None:
        """Up to when the read model is complete: now, once the projector has waited a moment on
        an empty log; else the time of the newest event it applied (a lagging projector's rows are
        that old). What the stall watchdog judges silence against, so lag never looks like a stall."""
        waiting = self._waiting_since
        if waiting is not None and asyncio.get_running_loop().time() - waiting >= self._caught_up_after_s:
            return datetime.now(UTC)
        return self._applied_through

    async def position(self) -> int | None:
        """The log position the read model reflects (None: nothing applied yet)."""
        return await self._database.read(lambda conn: _load_position(conn, self._name))

    async def run(self, *, stop: asyncio.Event | None = None, idle_timeout_s: float | None = None) -> int:
        """Apply events until ``stop`` is set or, with ``idle_timeout_s``, the log stays idle that long.

        Returns the number of events applied.
        """
        position = await self.position()
        applied = 0
        log.info("projector starting", name=self._name, after=position)
        # Read ahead in a separate task: while one batch is being written the next one gathers,
        # so batches grow with load while a lone event is written at once.
        queue: asyncio.Queue[LoggedEvent | _EndOfLog] = asyncio.Queue(maxsize=self._batch_size)
        async with self._bus.read_events(after=position, idle_timeout_s=idle_timeout_s) as events:
            reader = asyncio.create_task(_read_into(events, queue), name=f"{self._name}-reader")
            stopped = asyncio.create_task(stop.wait()) if stop is not None else None
            try:
                while not (stop is not None and stop.is_set()):
                    batch, end = await self._next_batch(queue, stopped)
                    if batch:
                        position = await self._apply(batch, position)
                        applied += len(batch)
                    if end is not None:
                        if end.error is not None:
                            raise end.error
                        break
            finally:
                for task in (reader, stopped):
                    if task is not None:
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
        log.info("projector stopped", name=self._name, applied=applied, position=position)
        return applied

    async def _next_batch(
        self, queue: asyncio.Queue[LoggedEvent | _EndOfLog], stopped: asyncio.Task[bool] | None
    ) -> tuple[list[LoggedEvent], _EndOfLog | None]:
        """Wait for one event, then gather more while they keep coming (each within batch_gap_s of
        the last), for up to batch_wait_s in all, up to batch_size.

        Also returns the end of the log if it was reached; an empty batch and no end mean stopped.
        """
        loop = asyncio.get_running_loop()
        if queue.empty():
            self._waiting_since = loop.time()
        item = await _get_unless_stopped(queue, stopped)
        self._waiting_since = None
        # Events trickle in as jobs move; a transaction (BEGIN, position, COMMIT, thread hop) costs
        # far more than an event in it, so under load a batch waits for company while events keep
        # arriving. On a quiet stack (a job's last events a millisecond apart, then nothing) the
        # wait would only delay the job's end in the read model, so a batch waits only while the
        # recent rate promises company within the gap.
        deadline = loop.time() + self._batch_wait_s
        batch: list[LoggedEvent] = []
        handed_over = False
        while isinstance(item, LoggedEvent):
            batch.append(item)
            self._arrivals.arrived(loop.time())
            if len(batch) == self._batch_size:
                return batch, None
            if queue.empty() and not handed_over:
                # Let the reader pass on what the bus already buffered, before any clock.
                await asyncio.sleep(0)
                handed_over = True
            if queue.empty():
                if not self._company_likely(loop.time()):
                    return batch, None
                next_item = await _get_before(queue, min(deadline, loop.time() + self._batch_gap_s))
                if next_item is None:
                    return batch, None
                item = next_item
            else:
                item = queue.get_nowait()
        return batch, item

    def _company_likely(self, now: float) -> bool:
        """Whether events arrived lately fast enough for the next to be likely within the gap."""
        if self._batch_wait_s <= 0:
            return False
        expected_in_gap = self._arrivals.recent(now) * self._batch_gap_s / self._batch_wait_s
        return expected_in_gap >= _COMPANY_EXPECTED

    async def _apply(self, batch: Sequence[LoggedEvent], position: int | None) -> int:
        new_position = batch[-1].position
        events = [logged.event for logged in batch]

        def transaction(conn: Connection) -> list[Transition]:
            # The position first: it takes the write lock, and detects a twin projector before any work.
            _advance_position(conn, self._name, position, new_position)
            return apply_events(conn, events)

        transitions = await self._database.write(transaction)
        for transition in transitions:
            _report(transition, batch[transition.index], spans=self._spans)
        newest = max(event.occurred_at for event in events)
        if newest.tzinfo is None:
            newest = newest.replace(tzinfo=UTC)
        self._applied_through = max(self._applied_through or newest, newest)
        log.debug("batch applied", name=self._name, events=len(batch), position=new_position)
        return new_position


async def rebuild(database: Database, bus: Bus, *, name: str = "projector", idle_timeout_s: float = 1.0) -> int:
    """Drop and recreate the read model, then replay the whole log into it. Returns events applied."""
    await reset_schema(database)
    return await Projector(database, bus, name=name).run(idle_timeout_s=idle_timeout_s)


@dataclass(frozen=True)
class Transition:
    """A job's status moved: ``events[index]`` moved it, and ``job`` is its row just after."""

    index: int
    job: JobRow


def apply_events(conn: Connection, events: Sequence[Event]) -> list[Transition]:
    """Load the rows ``events`` touch, fold the events in order, write back what changed.

    Returns the status changes, in order (a job pre-written by the ingress is already pending).
    """
    projection = _load(conn, events)
    loaded = dict(projection.jobs)
    transitions = []
    for index, event in enumerate(events):
        before = projection.jobs.get(event.job_id)
        apply_event(projection, event)
        after = projection.jobs.get(event.job_id)
        if after is not None and (before is None or before.status is not after.status):
            transitions.append(Transition(index, after))
    # With the per-owner usage counters they feed, moved by the same rows (projector.usage).
    write_jobs(conn, loaded, [projection.jobs[key] for key in sorted(projection.changed_jobs)])
    upsert(conn, images, [projection.images[key].to_columns() for key in sorted(projection.changed_images)])
    upsert(conn, upstream_quotas, [quota_columns(event) for _, event in sorted(projection.quotas.items())])
    return transitions


def _report(transition: Transition, logged: LoggedEvent, *, spans: bool) -> None:
    """Count a committed status change, and log it in the trace of the event that made it, so a
    job's projector line joins its ingress and worker lines.

    With ``spans`` (an exporter takes them) a sampled trace also gets a span here; without, the
    trace id is put on the line directly, since a span nobody receives costs three log lines.
    """
    job = transition.job
    if job.status is JobStatus.PENDING:
        return  # counted at submission (imagebus_jobs_submitted_total), or a requeue
    JOBS.labels(job.status.value, job.backend, job.model).inc()
    terminal = job.status.is_terminal()
    if not (spans or terminal):
        _log_projected(job, logged, terminal, None)
        return
    context = trace_context(logged.trace_headers)
    if spans and trace.get_current_span(context).get_span_context().trace_flags.sampled:
        attributes = {"imagebus.job_id": job.id, "imagebus.status": job.status.value}
        with tracer.start_as_current_span(
            f"project {logged.event.type}", context=context, kind=SpanKind.CONSUMER, attributes=attributes
        ):
            _log_projected(job, logged, terminal, trace_id_of())
    else:
        _log_projected(job, logged, terminal, trace_id_of(context))


def _log_projected(job: JobRow, logged: LoggedEvent, terminal: bool, trace_id: str | None) -> None:
    # One info line per job (its end); the moves before it are debug.
    emit = log.info if terminal else log.debug
    traced = {} if trace_id is None else {"trace_id": trace_id}
    emit("job_projected", job_id=job.id, status=job.status.value, position=logged.position, **traced)


def quota_columns(event: UpstreamQuotaObserved) -> dict[str, Any]:
    return {
        "source": event.source,
        "backend": event.backend,
        "used": event.used,
        "quota_limit": event.limit,
        "remaining": event.remaining,
        "resets_at": event.resets_at,
        "observed_at": event.occurred_at,
    }


def _load(conn: Connection, events: Sequence[Event]) -> Projection:
    job_ids = {event.job_id for event in events}
    image_ids = {event.image_id for event in events if isinstance(event, ImageStored | ImageExpired | ImageDeleted)}
    projection = Projection()
    rows = conn.execute(_JOBS_BY_ID, {"ids": list(job_ids)})
    projection.jobs = {row.id: JobRow.from_columns(row._mapping) for row in rows}
    if image_ids:
        rows = conn.execute(_IMAGES_BY_ID, {"ids": list(image_ids)})
        projection.images = {row.id: ImageRow.from_columns(row._mapping) for row in rows}
    return projection


def _load_position(conn: Connection, name: str) -> int | None:
    return conn.execute(_POSITION, {"projector": name}).scalar_one_or_none()


def _advance_position(conn: Connection, name: str, old: int | None, new: int) -> None:
    if old is None:
        try:
            conn.execute(_FIRST_POSITION, {"name": name, "position": new})
        except IntegrityError as error:
            raise ProjectorConflict(f"projector {name!r} already has a position") from error
        return
    moved = conn.execute(_NEXT_POSITION, {"projector": name, "old": old, "new": new})
    if moved.rowcount != 1:
        raise ProjectorConflict(f"projector {name!r} is no longer at position {old}")


async def _read_into(events: AsyncIterator[LoggedEvent], queue: asyncio.Queue[LoggedEvent | _EndOfLog]) -> None:
    try:
        async for logged in events:
            await queue.put(logged)
    except Exception as error:  # handed to run(), which raises it in its own task
        await queue.put(_EndOfLog(error))
    else:
        await queue.put(_EndOfLog())


async def _get_before(queue: asyncio.Queue[LoggedEvent | _EndOfLog], deadline: float) -> LoggedEvent | _EndOfLog | None:
    """The next item, or None if none comes before loop time ``deadline``."""
    if deadline <= asyncio.get_running_loop().time():
        return None
    try:
        async with asyncio.timeout_at(deadline):
            return await queue.get()  # a get cut off by the timeout leaves the item in the queue
    except TimeoutError:
        return None


async def _get_unless_stopped(
    queue: asyncio.Queue[LoggedEvent | _EndOfLog], stopped: asyncio.Task[bool] | None
) -> LoggedEvent | _EndOfLog | None:
    """The next item, or None once ``stopped`` completes first."""
    if not queue.empty() or stopped is None:
        return await queue.get()
    getter = asyncio.ensure_future(queue.get())
    await asyncio.wait({getter, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    return None
