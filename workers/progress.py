"""Forwarding progress from the backend's thread to the bus, in order, without blocking the backend."""

from __future__ import annotations

import asyncio
import base64
import contextlib

import structlog

from bus import Bus
from schemas import JobProgress
from workers.backends.base import Progress

log = structlog.get_logger(__name__)


class ProgressPublisher:
    """Called on the backend thread; publishes JobProgress events sequentially on the event loop.

    The backend never waits for the bus: a slow broker delays progress events, not diffusion.
    """

    def __init__(self, bus: Bus, job_id: str, attempt: int, loop: asyncio.AbstractEventLoop) -> None:
        self._bus = bus
        self._job_id = job_id
        self._attempt = attempt
        self._loop = loop
        self._queue: asyncio.Queue[Progress | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def __enter__(self) -> ProgressPublisher:
        self._task = self._loop.create_task(self._drain())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def __call__(self, progress: Progress) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, progress)

    async def flush(self) -> None:
        """Wait until every progress event reported so far is published."""
        self._queue.put_nowait(None)
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _drain(self) -> None:
        while (progress := await self._queue.get()) is not None:
            preview = None
            if progress.preview_jpeg is not None:
                preview = "data:image/jpeg;base64," + base64.b64encode(progress.preview_jpeg).decode()
            event = JobProgress(
                job_id=self._job_id,
                step=progress.step,
                total_steps=progress.total_steps,
                attempt=self._attempt,
                preview=preview,
            )
            try:
                await self._bus.publish_event(event)
            except Exception as exc:  # progress is best effort; the terminal event is not
                log.warning("progress_publish_failed", error=str(exc))
