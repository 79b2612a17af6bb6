"""One bus subscription per ingress process, fanned out in memory to every event stream.

Each SSE stream of this process registers an inbox here instead of subscribing to the bus itself,
and one timer asks the read model where every watched job stands (its status, and its queue
position while pending) in one query for all of them, instead of each stream polling on its own.
From the same subscription this process keeps the latest step of each running job: per-step
progress is live-only (never in the log, so never in the read model), and polling reads find it
here (``LiveProgress.overlay``). Every replica subscribes to every job's events, so any replica
answers for any job; one started mid-job knows its step from the next step on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace

import structlog

from bus import Bus
from projector.readside import JobRecord, ReadModel
from schemas import (
    Event,
    ImageStored,
    JobProgress,
    JobRequeued,
    JobStatus,
)

log = structlog.get_logger(__name__)

# How often the watched jobs' states are read (a queue position moves, an end the bus did not show).
REFRESH_S = 1.0
# Running jobs whose latest step is kept; beyond it the least recently advanced is forgotten.
MAX_TRACKED_JOBS = 20_000
# Pause before subscribing again after the subscription failed.
_RESUBSCRIBE_S = 1.0


@dataclass(frozen=True)
class JobState:
    """Where a watched job stands in the read model, as the timer found it."""

    status: JobStatus
    # How many jobs of its backend wait ahead of it; None unless pending.
    position: int | None


# What a job's stream is handed: its events as they happen, and its state when that changes.
StreamItem = Event | JobState


# Statuses whose step only the live channel knows (the read model has a completed job's).
_SHOWS_LIVE_STEP = frozenset({JobStatus.PROCESSING, JobStatus.FAILED, JobStatus.CANCELED})


@dataclass(frozen=True)
class _Step:
    attempt: int
    step: int
    total_steps: int


class LiveProgress:
    """The latest step of each job heard of, bounded (the least recently advanced job is forgotten
    first); forgotten when the job is requeued."""

    def __init__(self, max_jobs: int = MAX_TRACKED_JOBS) -> None:
        self._max_jobs = max_jobs
        self._steps: OrderedDict[str, _Step] = OrderedDict()

    def __len__(self) -> int:
        return len(self._steps)

    def note(self, event: Event) -> None:
        match event:
            case JobProgress():
                # The newest wins: steps of one attempt arrive in order from its one worker.
                self._steps[event.job_id] = _Step(event.attempt, event.step, event.total_steps)
                self._steps.move_to_end(event.job_id)
                if len(self._steps) > self._max_jobs:
                    self._steps.popitem(last=False)
            case JobRequeued():
                # It starts over, its attempts counted from 1 again. An ended job keeps its step:
                # the bus runs ahead of the read model, which may show it processing a moment
                # longer (and a failed or canceled one shows the step it stopped at).
                self._steps.pop(event.job_id, None)

    def overlay(self, job: JobRecord) -> JobRecord:
        """``job`` with its latest live step, when it is running (or stopped: failed, canceled)
        and the step is of its latest attempt."""
        if job.status not in _SHOWS_LIVE_STEP:
            return job
        step = self._steps.get(job.id)
        if step is None or step.attempt < job.attempt:
            return job  # none yet, or of an attempt before a redelivery (which starts over)
        return replace(job, step=step.step, total_steps=step.total_steps)


class LiveEvents:
    """The process's one ``watch_events()`` subscription, its fan-out, and the shared state timer.

    Run it with ``async with live.running():`` (the app's lifespan); streams then use
    ``watch_job`` and ``watch_images``, which only register an in-memory inbox.
    """

    def __init__(
        self, bus: Bus, read_model: ReadModel, progress: LiveProgress, *, refresh_s: float = REFRESH_S
    ) -> None:
        self._bus = bus
        self._read_model = read_model
        self.progress = progress
        self._refresh_s = refresh_s
        self._job_inboxes: dict[str, set[asyncio.Queue[StreamItem]]] = {}
        self._image_inboxes: set[asyncio.Queue[ImageStored]] = set()
        # The state each watched job was last found in (a stream is told only of changes).
        self._states: dict[str, JobState] = {}

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        subscribed = asyncio.Event()
        listener = asyncio.create_task(self._listen(subscribed), name="live-events")
        timer = asyncio.create_task(self._refresh_forever(), name="live-refresh")
        try:
            # Streams start only once the subscription is in place, so a stream misses nothing
            # published after it registered.
            await subscribed.wait()
            yield
        finally:
            for task in (listener, timer):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    @contextlib.contextmanager
    def watch_job(self, job_id: str) -> Iterator[asyncio.Queue[StreamItem]]:
        """An inbox of the job's events and state changes for as long as the block lasts."""
        inbox: asyncio.Queue[StreamItem] = asyncio.Queue()
        self._job_inboxes.setdefault(job_id, set()).add(inbox)
        try:
            yield inbox
        finally:
            inboxes = self._job_inboxes.get(job_id, set())
            inboxes.discard(inbox)
            if not inboxes:
                self._job_inboxes.pop(job_id, None)
                self._states.pop(job_id, None)

    @contextlib.contextmanager
    def watch_images(self) -> Iterator[asyncio.Queue[ImageStored]]:
        """An inbox of every ImageStored (any owner's: the gallery stream filters)."""
        inbox: asyncio.Queue[ImageStored] = asyncio.Queue()
        self._image_inboxes.add(inbox)
        try:
            yield inbox
        finally:
            self._image_inboxes.discard(inbox)

    def dispatch(self, event: Event) -> None:
        self.progress.note(event)
        for inbox in self._job_inboxes.get(event.job_id, ()):
            inbox.put_nowait(event)
        if isinstance(event, ImageStored):
            for image_inbox in self._image_inboxes:
                image_inbox.put_nowait(event)

    async def refresh(self) -> None:
        """Read every watched job's state in one query; tell each job's streams of a change."""
        if not self._job_inboxes:
            return
        found = await self._read_model.stream_states(list(self._job_inboxes))
        for job_id, (status, position) in found.items():
            state = JobState(status, position)
            inboxes = self._job_inboxes.get(job_id)
            if inboxes is None or self._states.get(job_id) == state:
                continue  # no longer watched, or nothing new
            self._states[job_id] = state
            for inbox in inboxes:
                inbox.put_nowait(state)

    async def _listen(self, subscribed: asyncio.Event) -> None:
        while True:
            try:
                async with self._bus.watch_events() as events:
                    subscribed.set()
                    async for event in events:
                        self.dispatch(event)
            except Exception as exc:
                # Streams still learn of ends from the timer meanwhile; steps pause.
                log.warning("live_events_subscription_lost", error=repr(exc), retry_in_s=_RESUBSCRIBE_S)
            await asyncio.sleep(_RESUBSCRIBE_S)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except Exception as exc:
                log.warning("stream_states_unread", error=repr(exc))
