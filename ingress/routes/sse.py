"""Server-Sent Events for one job: queue position, steps with previews, then one terminal event.

The stream listens on the bus, not on anything in this process, so any ingress replica serves
any job. Every (re)connection starts with the job's current state from the read model, so a
client reconnecting with Last-Event-ID misses nothing terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from litestar import Request, get
from litestar.params import FromPath
from litestar.response import ServerSentEvent, ServerSentEventMessage

from ingress.auth import require_owner
from ingress.hardening import HOLDS_STREAM
from ingress.openapi_responses import error_responses, event_stream_response
from ingress.services import Services
from projector.apply import stored_row
from projector.queries import GalleryRecord
from projector.readside import JobRecord
from schemas import (
    Event,
    GenerationParams,
    ImageStored,
    JobCanceled,
    JobFailed,
    JobProgress,
    JobRequeued,
    JobStarted,
    JobStatus,
    JobSucceeded,
)

KEEP_ALIVE_S = 15.0


class Comment(ServerSentEventMessage):
    """A comment line alone. Litestar adds an empty ``data:`` line to comments, which is an
    empty event to any client that parses the stream itself rather than through EventSource."""

    def encode(self) -> bytes:
        return f": {self.comment}\r\n\r\n".encode()


# How often a quiet stream re-reads the job (queue position, and an end the bus did not show).
REFRESH_S = 1.0
# How long to wait for the read model to show a terminal event the bus already announced.
TERMINAL_VISIBLE_TIMEOUT_S = 10.0


@get(
    "/sse/gallery",
    summary="New images of the caller as they are stored (Server-Sent Events)",
    responses={200: event_stream_response(), **error_responses(401, 503)},
    opt={HOLDS_STREAM: True},
)
async def gallery_events(request: Request[Any, Any, Any]) -> ServerSentEvent:
    services: Services = request.app.state.services
    owner = (await require_owner(services.keyring, request)).owner
    return ServerSentEvent(_gallery_stream(services, owner), headers={"Cache-Control": "no-store"})


async def _gallery_stream(services: Services, owner: str) -> AsyncIterator[ServerSentEventMessage]:
    async with services.bus.watch_events() as live:
        inbox: asyncio.Queue[Event] = asyncio.Queue()
        reader = asyncio.create_task(_forward(live, inbox))
        # job id -> its params when the job is the caller's, None when it is someone else's.
        jobs: dict[str, GenerationParams | None] = {}
        try:
            yield Comment(comment="connected")
            while True:
                try:
                    event = await asyncio.wait_for(inbox.get(), KEEP_ALIVE_S)
                except TimeoutError:
                    yield Comment(comment="keep-alive")
                    continue
                if not isinstance(event, ImageStored):
                    continue
                if event.job_id not in jobs:
                    record = await services.read_model.get_job(event.job_id, owner)
                    jobs[event.job_id] = None if record is None else record.params
                params = jobs[event.job_id]
                if params is None:
                    continue
                item = services.images.gallery_image(GalleryRecord(stored_row(event, owner), params))
                yield _message(item.model_dump(mode="json"), event.message_id)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


@get(
    "/sse/{job_id:str}",
    summary="Live progress of a job (Server-Sent Events)",
    responses={200: event_stream_response(), **error_responses(401, 404, 503)},
    opt={HOLDS_STREAM: True},
)
async def job_events(request: Request[Any, Any, Any], job_id: FromPath[str]) -> ServerSentEvent:
    services: Services = request.app.state.services
    owner = (await require_owner(services.keyring, request)).owner
    job = await services.jobs.job(job_id, owner)  # 404 before the stream starts, for other owners too
    return ServerSentEvent(_job_stream(services, job.id, owner), headers={"Cache-Control": "no-store"})


async def _job_stream(services: Services, job_id: str, owner: str) -> AsyncIterator[ServerSentEventMessage]:
    async with services.bus.watch_events(job_id) as live:
        inbox: asyncio.Queue[Event] = asyncio.Queue()
        # A reader task: the bus iterator must not be cancelled mid-wait, a queue get may.
        reader = asyncio.create_task(_forward(live, inbox))
        try:
            async for message in _messages(services, job_id, owner, inbox):
                yield message
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def _forward(live: AsyncIterator[Event], inbox: asyncio.Queue[Event]) -> None:
    async for event in live:
        inbox.put_nowait(event)


async def _messages(
    services: Services, job_id: str, owner: str, inbox: asyncio.Queue[Event]
) -> AsyncIterator[ServerSentEventMessage]:
    # Subscribed first, then the snapshot: nothing published in between is lost.
    job = await services.jobs.job(job_id, owner)
    if job.status.is_terminal():
        yield _terminal(services, job)
        return
    position: int | None = None
    if job.status is JobStatus.PENDING:
        position = await services.read_model.queue_position(job)
        yield _message({"status": "pending", "position": position}, f"{job_id}-queued")
    else:
        yield _message({"status": "processing", "step": job.step, "total_steps": job.total_steps}, None)
    idle_s = 0.0
    while True:
        try:
            event = await asyncio.wait_for(inbox.get(), REFRESH_S)
        except TimeoutError:
            # An event published between the subscription and the snapshot reached neither, so
            # the read model is asked again: it catches a job that ended in that gap.
            job = await services.jobs.job(job_id, owner)
            if job.status.is_terminal():
                yield _terminal(services, job)
                return
            if job.status is JobStatus.PENDING:
                now = await services.read_model.queue_position(job)
                if now != position:
                    position = now
                    yield _message({"status": "pending", "position": position}, None)
            idle_s += REFRESH_S
            if idle_s >= KEEP_ALIVE_S:
                idle_s = 0.0
                yield Comment(comment="keep-alive")
            continue
        idle_s = 0.0
        match event:
            case JobRequeued():
                job = await services.jobs.job(job_id, owner)
                position = await services.read_model.queue_position(job)
                yield _message({"status": "pending", "position": position}, event.message_id)
            case JobStarted():
                position = None
                yield _message({"status": "processing", "step": 0, "total_steps": job.total_steps}, event.message_id)
            case JobProgress():
                position = None
                data = {"status": "processing", "step": event.step, "total_steps": event.total_steps}
                if event.preview:
                    data["preview"] = event.preview
                yield _message(data, event.message_id)
            case JobSucceeded() | JobFailed() | JobCanceled():
                job = await _terminal_record(services, job_id, owner)
                if job.status.is_terminal():
                    yield _terminal(services, job)
                    return
                # The read model lags far behind the bus: the refresh above ends the stream later.


async def _terminal_record(services: Services, job_id: str, owner: str) -> JobRecord:
    """The job once the read model shows it terminal (the bus can be a few ms ahead of it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TERMINAL_VISIBLE_TIMEOUT_S
    while True:
        job = await services.jobs.job(job_id, owner)
        if job.status.is_terminal() or loop.time() > deadline:
            return job
        await asyncio.sleep(0.01)


def _terminal(services: Services, job: JobRecord) -> ServerSentEventMessage:
    view = services.jobs.job_view(job).model_dump(mode="json")
    return _message(view, f"{job.id}-{job.status.value}")


def _message(data: dict[str, Any], event_id: str | None) -> ServerSentEventMessage:
    return ServerSentEventMessage(data=json.dumps(data), id=event_id)
