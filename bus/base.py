"""The Bus protocol: every adapter (NATS JetStream, AMQP, in-memory) implements exactly this."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from schemas import CancelJob, Event, GenerateImage


@dataclass(frozen=True)
class BusOptions:
    """Knobs shared by every adapter; built from settings in main() and passed down."""

    # Prefix of every stream, subject, exchange and queue, so several installations
    # (or test runs) can share one broker.
    namespace: str = "imagebus"
    # A command not acked nor marked in-progress within this time is redelivered.
    ack_wait_s: float = 30.0
    # Times one command may be run. The bus delivers it once more after that (``delivery_limit``):
    # on that verdict delivery a worker fails the job and dead-letters the command without running
    # it, so a command that kills its worker every time ends ``failed`` instead of vanishing.
    max_deliveries: int = 5
    # How long the event log keeps events (the projector can rebuild from it within this window).
    event_retention_s: float = 7 * 24 * 3600.0
    # Copies of each stream (NATS) a JetStream cluster keeps: 3 on a 3-server cluster, so losing a
    # server loses nothing. None: streams are created with 1 and an existing stream keeps what it
    # has (an operator may have changed it by hand).
    replicas: int | None = None

    @property
    def delivery_limit(self) -> int:
        """Deliveries the broker makes of one command: the runs plus the verdict delivery."""
        return self.max_deliveries + 1


class CommandDelivery(Protocol):
    """One delivery of a GenerateImage command to one worker. Settled exactly once."""

    @property
    def command(self) -> GenerateImage: ...

    @property
    def attempt(self) -> int:
        """1 on the first delivery, 2 on the first redelivery, ..."""
        ...

    @property
    def trace_headers(self) -> Mapping[str, str]:
        """The W3C trace context the command was published in (``bus.tracing``); may be empty."""
        ...

    async def ack(self) -> None:
        """Done with it (succeeded, failed for good or canceled): never deliver it again."""

    async def nak(self, delay_s: float = 0.0) -> None:
        """Hand it back to be redelivered after ``delay_s`` (to this or another worker)."""

    async def in_progress(self) -> None:
        """Heartbeat: still working on it, push the redelivery deadline back."""

    async def term(self) -> None:
        """Never deliver it again and keep it in the dead-letter place (unreadable, or poison)."""


@dataclass(frozen=True)
class LoggedEvent:
    """An event read from the durable log with its position (strictly increasing)."""

    position: int
    event: Event
    # The W3C trace context the event was published in (``bus.tracing``); may be empty.
    trace_headers: Mapping[str, str] = field(default_factory=dict)


class Bus(Protocol):
    options: BusOptions

    async def close(self) -> None: ...

    # Both publishes carry the current span's trace context in the message headers.

    async def publish_command(self, command: GenerateImage) -> None:
        """Durably enqueue on ``command.queue`` (pool, else backend); de-duplicated on ``command.message_id``."""

    async def publish_event(self, event: Event) -> None:
        """Durably append to the event log (confirmed before returning).

        A live-only event (``event.live_only``: per-step progress) goes to the live channel
        instead: to whoever watches now, best effort and unconfirmed, never into the log. Dropped
        while the broker is away, and it may reach a watcher before or after a durable event
        published just before or after it.
        """

    async def publish_control(self, control: CancelJob) -> None:
        """Broadcast to the live workers of ``control.backend``; not stored."""

    def consume_commands(
        self, backend: str, *, idle_timeout_s: float | None = None, prefetch: int = 1
    ) -> AbstractAsyncContextManager[AsyncIterator[CommandDelivery]]:
        """Work-queue consumption for one queue (a backend's, or a catalog pool's).

        ``backend`` names the queue. Deliveries come one at a time; the caller may hold up to
        ``prefetch`` unsettled at once (a worker running several jobs, or gathering a batch).
        With ``idle_timeout_s`` the iterator ends after that long without a delivery
        (burst mode for tests and benchmarks); otherwise it runs until the context exits.
        """
        ...

    def read_events(
        self, *, after: int | None = None, idle_timeout_s: float | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[LoggedEvent]]:
        """The durable event log in order, from just after position ``after`` (None: the start).

        Live-only events are not in it (logs written before they were live-only may hold some).
        """
        ...

    def watch_events(self, job_id: str | None = None) -> AbstractAsyncContextManager[AsyncIterator[Event]]:
        """Events from now on (all jobs, or one), durable and live-only ones alike. Subscribed
        when the context is entered."""
        ...

    def watch_control(self, backend: str) -> AbstractAsyncContextManager[AsyncIterator[CancelJob]]:
        """Live control messages for one backend. Subscribed when the context is entered."""
        ...

    async def command_backlog(self, backend: str) -> int:
        """Commands waiting (not yet acked) for ``backend``."""
        ...
