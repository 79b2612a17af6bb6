"""What tests read of a bus: a job's events in the durable log, and every event published while a
block runs (live-only progress included, which the log never holds)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from bus import Bus
from schemas import Event


async def logged_events(bus: Bus, job_id: str) -> list[Event]:
    """The job's events in the durable log, in order."""
    async with bus.read_events(idle_timeout_s=0.3) as events:
        return [logged.event async for logged in events if logged.event.job_id == job_id]


@asynccontextmanager
async def watched_events(bus: Bus) -> AsyncIterator[list[Event]]:
    """Every event published meanwhile, live-only progress included (the log has no progress)."""
    seen: list[Event] = []

    async def watch(live: AsyncIterator[Event]) -> None:
        async for event in live:
            seen.append(event)

    async with bus.watch_events() as live:
        watcher = asyncio.create_task(watch(live))
        try:
            yield seen
            await asyncio.sleep(0.2)  # progress published last may still be on its way
        finally:
            watcher.cancel()
            with suppress(asyncio.CancelledError):
                await watcher
