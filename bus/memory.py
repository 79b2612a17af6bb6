"""In-process bus with the brokers' semantics, for tests and single-process runs.

Work-queue commands with attempts, nak delays, ack-wait redelivery, a delivery limit and a dead
list; de-duplication on message ids; an event log with positions from 1; live watchers (who also
get the live-only events the log never holds) and control broadcast. Two ``MemoryBus.named`` calls
with the same URL and namespace share state, like two connections to one broker; a fresh
``memory://<unique>`` URL gives a fresh one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager

from bus._delivery import SettleOnce
from bus._memory_state import Broker, Entry, EventWatcher, WorkQueue
from bus._names import checked_token
from bus.base import BusOptions, CommandDelivery, LoggedEvent
from bus.tracing import trace_headers
from schemas import CancelJob, Event, GenerateImage

# The process-wide "broker": state outlives any one MemoryBus, as a real broker's would.
_BROKERS: dict[tuple[str, str], Broker] = {}


class _MemoryDelivery(SettleOnce):
    def __init__(self, queue: WorkQueue, entry: Entry, ack_wait_s: float) -> None:
        self._queue = queue
        self._entry = entry
        self._ack_wait_s = ack_wait_s
        self._attempt = entry.deliveries
        super().__init__()

    @property
    def command(self) -> GenerateImage:
        return self._entry.command

    @property
    def attempt(self) -> int:
        return self._attempt

    @property
    def trace_headers(self) -> Mapping[str, str]:
        return self._entry.trace_headers

    async def ack(self) -> None:
        self._settle()
        self._queue.remove(self._entry, dead=False)

    async def nak(self, delay_s: float = 0.0) -> None:
        self._settle()
        self.hand_back(delay_s)

    async def in_progress(self) -> None:
        self._require_unsettled()
        if self._entry.holder is self:
            self._entry.deadline = time.monotonic() + self._ack_wait_s

    async def term(self) -> None:
        self._settle()
        self._queue.remove(self._entry, dead=True)

    def hand_back(self, delay_s: float = 0.0) -> None:
        self.settled = True
        # A delivery whose ack wait already ran out no longer holds the command.
        if self._entry.holder is self:
            self._queue.hand_back(self._entry, delay_s)


class MemoryBus:
    """The Bus protocol in process memory; build it with ``MemoryBus.named(url, options)``."""

    def __init__(self, broker: Broker, options: BusOptions) -> None:
        self.options = options
        self._broker = broker

    @classmethod
    def named(cls, url: str, options: BusOptions) -> MemoryBus:
        key = (url, checked_token(options.namespace, "namespace"))
        return cls(_BROKERS.setdefault(key, Broker()), options)

    async def close(self) -> None:
        # Nothing to release; the shared state stays for the other holders of the URL.
        return None

    async def publish_command(self, command: GenerateImage) -> None:
        self._broker.queue(checked_token(command.queue, "queue")).put(command, trace_headers())

    async def publish_event(self, event: Event) -> None:
        if event.live_only:
            self._broker.broadcast_event(event)
        else:
            self._broker.append_event(event, trace_headers())

    async def publish_control(self, control: CancelJob) -> None:
        self._broker.broadcast_control(control)

    @asynccontextmanager
    async def consume_commands(
        self, backend: str, *, idle_timeout_s: float | None = None, prefetch: int = 1
    ) -> AsyncIterator[AsyncIterator[CommandDelivery]]:
        queue = self._broker.queue(checked_token(backend, "backend"))
        unsettled: list[_MemoryDelivery] = []

        async def deliveries() -> AsyncGenerator[CommandDelivery, None]:
            while (delivery := await self._next_delivery(queue, idle_timeout_s)) is not None:
                unsettled[:] = [d for d in unsettled if not d.settled] + [delivery]
                yield delivery

        try:
            async with aclosing(deliveries()) as iterator:
                yield iterator
        finally:
            # Leaving with a delivery unsettled is a crashed worker: it goes back at once.
            for delivery in unsettled:
                if not delivery.settled:
                    delivery.hand_back()

    async def _next_delivery(self, queue: WorkQueue, idle_timeout_s: float | None) -> _MemoryDelivery | None:
        idle_deadline = None if idle_timeout_s is None else time.monotonic() + idle_timeout_s
        ack_wait_s = self.options.ack_wait_s
        while True:
            delivery = queue.take(
                lambda entry: _MemoryDelivery(queue, entry, ack_wait_s), ack_wait_s, self.options.delivery_limit
            )
            if delivery is not None:
                return delivery
            waits = [w for w in (queue.seconds_to_next_change(), _left(idle_deadline)) if w is not None]
            if idle_deadline is not None and time.monotonic() >= idle_deadline:
                return None
            await queue.wakeup.wait(min(waits) if waits else None)

    async def command_backlog(self, backend: str) -> int:
        return len(self._broker.queue(checked_token(backend, "backend")).entries)

    def dead_letters(self, backend: str) -> list[GenerateImage]:
        """Commands dropped by ``term()`` or after their last allowed delivery (for tests)."""
        return list(self._broker.queue(checked_token(backend, "backend")).dead)

    @asynccontextmanager
    async def read_events(
        self, *, after: int | None = None, idle_timeout_s: float | None = None
    ) -> AsyncIterator[AsyncIterator[LoggedEvent]]:
        broker = self._broker

        async def events() -> AsyncGenerator[LoggedEvent, None]:
            index = max(after or 0, 0)  # position p is log[p - 1]
            while True:
                while index < len(broker.log):
                    index += 1
                    yield LoggedEvent(
                        position=index, event=broker.log[index - 1], trace_headers=broker.log_headers[index - 1]
                    )
                if not await _wait_for_more(broker, index, idle_timeout_s):
                    return

        async with aclosing(events()) as iterator:
            yield iterator

    @asynccontextmanager
    async def watch_events(self, job_id: str | None = None) -> AsyncIterator[AsyncIterator[Event]]:
        watcher = EventWatcher(job_id)
        self._broker.event_watchers.append(watcher)

        async def events() -> AsyncGenerator[Event, None]:
            while True:
                yield await watcher.inbox.get()

        try:
            async with aclosing(events()) as iterator:
                yield iterator
        finally:
            self._broker.event_watchers.remove(watcher)

    @asynccontextmanager
    async def watch_control(self, backend: str) -> AsyncIterator[AsyncIterator[CancelJob]]:
        inbox: asyncio.Queue[CancelJob] = asyncio.Queue()
        watchers = self._broker.control_watchers.setdefault(checked_token(backend, "backend"), [])
        watchers.append(inbox)

        async def controls() -> AsyncGenerator[CancelJob, None]:
            while True:
                yield await inbox.get()

        try:
            async with aclosing(controls()) as iterator:
                yield iterator
        finally:
            watchers.remove(inbox)


async def _wait_for_more(broker: Broker, seen: int, idle_timeout_s: float | None) -> bool:
    """Wait until the log grows past ``seen``; False if ``idle_timeout_s`` passed first."""
    deadline = None if idle_timeout_s is None else time.monotonic() + idle_timeout_s
    while len(broker.log) <= seen:
        left = _left(deadline)
        if left is not None and left <= 0:
            return False
        await broker.log_wakeup.wait(left)
    return True


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
