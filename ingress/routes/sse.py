"""Server-Sent Events for one job: queue position, steps with previews, then one terminal event.

A stream listens on the bus, not on anything another request did in this process, so any ingress
replica serves any job; its events come through the process's one subscription
(``ingress/live.py``), and its queue position and an end the bus did not show from the process's
one timer. Every (re)connection starts with the job's current state from the read model, so a
client reconnecting with Last-Event-ID misses nothing terminal.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from litestar import Request, get
from litestar.params import FromPath
from litestar.response import ServerSentEvent, ServerSentEventMessage

from ingress.auth import require_owner
from ingress.hardening import HOLDS_STREAM
from ingress.live import JobState, StreamItem
from ingress.openapi_responses import error_responses, event_stream_response
from ingress.services import Services
from projector.apply import stored_row
from projector.queries import GalleryRecord
from projector.readside import JobRecord
from schemas import (
    GenerationParams,
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
    with services.live.watch_images() as inbox:
        # job id -> its params when the job is the caller's, None when it is someone else's.
        jobs: dict[str, GenerationParams | None] = {}
        yield Comment(comment="connected")
        while True:
            try:
                event = await asyncio.wait_for(inbox.get(), KEEP_ALIVE_S)
            except TimeoutError:
                yield Comment(comment="keep-alive")
                continue
            if event.job_id not in jobs:
                record = await services.read_model.get_job(event.job_id, owner)
                jobs[event.job_id] = None if record is None else record.params
            params = jobs[event.job_id]
            if params is None:
                continue
            item = services.images.gallery_image(GalleryRecord(stored_row(event, owner), params))
            yield _message(item.model_dump(mode="json"), event.message_id)


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
    with services.live.watch_job(job_id) as inbox:
        async for message in _messages(services, job_id, owner, inbox):
            yield message


async def _messages(
    services: Services, job_id: str, owner: str, inbox: asyncio.Queue[StreamItem]
) -> AsyncIterator[ServerSentEventMessage]:
    # Registered first, then the snapshot: nothing published in between is lost.
    job = await services.jobs.job(job_id, owner)
    if job.status.is_terminal():
        yield _terminal(services, job)
        return
    position: int | None = None
    # The attempt whose steps are showing: live steps ride another channel than JobStarted and may
    # overtake it, and a late JobStarted must not take the steps back to 0.
    attempt_shown = 0
    if job.status is JobStatus.PENDING:
        position = await services.read_model.queue_position(job)
        yield _message({"status": "pending", "position": position}, f"{job_id}-queued")
    else:
        attempt_shown = job.attempt
        yield _message({"status": "processing", "step": job.step, "total_steps": job.total_steps}, None)
    while True:
        try:
            item = await asyncio.wait_for(inbox.get(), KEEP_ALIVE_S)
        except TimeoutError:
            yield Comment(comment="keep-alive")
            continue
        match item:
            case JobState(status=status) if status.is_terminal():
                # An end the bus did not show this stream (it ended before the stream registered,
                # or while the subscription was lost): the read model has it.
                job = await services.jobs.job(job_id, owner)
                if job.status.is_terminal():
                    yield _terminal(services, job)
                    return
            case JobState(status=JobStatus.PENDING, position=now) if now != position:
                position = now
                yield _message({"status": "pending", "position": position}, None)
            case JobRequeued():
                job = await services.jobs.job(job_id, owner)
                position = await services.read_model.queue_position(job)
                attempt_shown = 0
                yield _message({"status": "pending", "position": position}, item.message_id)
            case JobStarted() if item.attempt > attempt_shown:
                position = None
                attempt_shown = item.attempt
                yield _message({"status": "processing", "step": 0, "total_steps": job.total_steps}, item.message_id)
            case JobProgress():
                position = None
                attempt_shown = max(attempt_shown, item.attempt)
                data = {"status": "processing", "step": item.step, "total_steps": item.total_steps}
                if item.preview:
                    data["preview"] = item.preview
                yield _message(data, item.message_id)
            case JobSucceeded() | JobFailed() | JobCanceled():
                job = await _terminal_record(services, job_id, owner)
                if job.status.is_terminal():
                    yield _terminal(services, job)
                    return
                # The read model lags far behind the bus: the timer's JobState ends the stream later.


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
