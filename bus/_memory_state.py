"""The state behind the in-memory bus: a work queue per backend, the event log, live watchers.

Plain data plus wake-ups; no I/O. Times are ``time.monotonic()`` so the state does not belong to
one event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from schemas import CancelJob, Event, GenerateImage

# Same de-duplication window as the JetStream streams.
DUPLICATE_WINDOW_S = 120.0

H = TypeVar("H")


class Wakeup:
    """Wakes every task waiting for "something changed"; each one then looks again."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def notify_all(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def wait(self, timeout_s: float | None) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait({waiter}, timeout=timeout_s)
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)


class RecentIds:
    """Message ids seen within the de-duplication window."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}

    def add(self, message_id: str) -> bool:
        """True if new; False for a duplicate within the window."""
        now = time.monotonic()
        if len(self._seen) > 1024:
            self._seen = {k: t for k, t in self._seen.items() if now - t < DUPLICATE_WINDOW_S}
        seen_at = self._seen.get(message_id)
        if seen_at is not None and now - seen_at < DUPLICATE_WINDOW_S:
            return False
        self._seen[message_id] = now
        return True


@dataclass(eq=False)
class Entry:
    """One stored command. ``holder`` is the delivery in flight, if any."""

    command: GenerateImage
    trace_headers: dict[str, str] = field(default_factory=dict)
    deliveries: int = 0
    max_deliveries: int = 0
    ready_at: float = 0.0
    holder: object | None = None
    deadline: float = 0.0


class WorkQueue:
    """Commands of one backend: each goes to one consumer, comes back on nak or ack-wait expiry."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.dead: list[GenerateImage] = []
        self.ids = RecentIds()
        self.wakeup = Wakeup()

    def put(self, command: GenerateImage, trace_headers: dict[str, str]) -> None:
        if self.ids.add(command.message_id):
            self.entries.append(Entry(command, trace_headers))
            self.wakeup.notify_all()

    def take(self, new_holder: Callable[[Entry], H], ack_wait_s: float, max_deliveries: int) -> H | None:
        """Deliver the first ready command to a holder made by ``new_holder``; None if none is ready."""
        now = time.monotonic()
        for entry in list(self.entries):
            if entry.holder is not None and entry.deadline <= now:
                self.hand_back(entry, delay_s=0.0)  # neither settled nor heartbeated in time
        for entry in self.entries:
            if entry.holder is None and entry.ready_at <= now:
                entry.deliveries += 1
                entry.max_deliveries = max_deliveries
                entry.deadline = now + ack_wait_s
                holder = new_holder(entry)
                entry.holder = holder
                return holder
        return None

    def seconds_to_next_change(self) -> float | None:
        """Until a delayed command becomes ready or an ack wait runs out; None if neither will."""
        times = [e.deadline if e.holder is not None else e.ready_at for e in self.entries]
        return max(0.0, min(times) - time.monotonic()) if times else None

    def hand_back(self, entry: Entry, delay_s: float) -> None:
        entry.holder = None
        if entry.deliveries >= entry.max_deliveries:
            self.remove(entry, dead=True)
        else:
            entry.ready_at = time.monotonic() + delay_s
        self.wakeup.notify_all()

    def remove(self, entry: Entry, *, dead: bool) -> None:
        if entry in self.entries:
            self.entries.remove(entry)
            if dead:
                self.dead.append(entry.command)


@dataclass
class EventWatcher:
    job_id: str | None
    inbox: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)


@dataclass
class Broker:
    """Everything one ``memory://`` URL and namespace holds."""

    queues: dict[str, WorkQueue] = field(default_factory=dict)
    log: list[Event] = field(default_factory=list)
    # The trace headers each logged event was published with (log_headers[i] is log[i]'s).
    log_headers: list[dict[str, str]] = field(default_factory=list)
    log_ids: RecentIds = field(default_factory=RecentIds)
    log_wakeup: Wakeup = field(default_factory=Wakeup)
    event_watchers: list[EventWatcher] = field(default_factory=list)
    control_watchers: dict[str, list[asyncio.Queue[CancelJob]]] = field(default_factory=dict)

    def queue(self, backend: str) -> WorkQueue:
        return self.queues.setdefault(backend, WorkQueue())

    def append_event(self, event: Event, trace_headers: dict[str, str]) -> None:
        if not self.log_ids.add(event.message_id):
            return
        self.log.append(event)
        self.log_headers.append(trace_headers)
        self.log_wakeup.notify_all()
        self.broadcast_event(event)

    def broadcast_event(self, event: Event) -> None:
        """To the watchers only (a live-only event, or a logged one's live copy)."""
        for watcher in self.event_watchers:
            if watcher.job_id in (None, event.job_id):
                watcher.inbox.put_nowait(event)

    def broadcast_control(self, control: CancelJob) -> None:
        for inbox in self.control_watchers.get(control.backend, []):
            inbox.put_nowait(control)
