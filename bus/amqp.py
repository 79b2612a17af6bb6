"""AMQP 0.9.1 adapter for RabbitMQ (3.10+).

Commands: a direct exchange routing to one quorum queue per backend, whose delivery limit and
dead-letter exchange bound the retries. Events: a topic exchange feeding a RabbitMQ stream (the
durable log, read from any offset) and, for live watchers, server-named exclusive queues. Control:
a topic exchange with one exclusive queue per watcher. Every name is prefixed by the namespace.

What RabbitMQ does differently from JetStream (callers need not care, but operators should know):
- no publish de-duplication: a retried publish is enqueued twice (the consumers are idempotent);
- no per-message redelivery delay: ``nak(delay_s)`` holds the message for the delay, then requeues;
- no ack-wait timer: an unacked message is redelivered when its consumer's channel or connection
  closes (or after the broker's ``consumer_timeout``, 30 min by default), so ``in_progress()``
  has nothing to do;
- ``command_backlog`` counts ready messages only (AMQP reports no unacked count without the
  management plugin);
- ``BusOptions.max_deliveries`` is fixed when a command queue is first declared: every role must
  use the same value (queue arguments cannot change; use a policy to change it later).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager, suppress
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)
from aio_pika.exceptions import ChannelNotFoundEntity

from bus._amqp_topology import declare_command_queue, declare_events_log, declare_topology
from bus._decoding import decoded_or_none
from bus._delivery import SettleOnce
from bus._names import AmqpNames, checked_token
from bus.base import BusOptions, CommandDelivery, LoggedEvent
from schemas import CancelJob, Event, GenerateImage, Message, decode_command, decode_control, decode_event, encode

# Stream consumers need a prefetch (credit); acks return it.
_EVENT_PREFETCH = 200


_T = TypeVar("_T")


class _AmqpDelivery(SettleOnce):
    def __init__(self, message: AbstractIncomingMessage, command: GenerateImage, delays: set[asyncio.Task[None]]):
        self._message = message
        self._command = command
        self._delays = delays
        super().__init__()

    @property
    def command(self) -> GenerateImage:
        return self._command

    @property
    def attempt(self) -> int:
        # Quorum queues count returned deliveries in x-delivery-count; absent on the first one.
        returned = (self._message.headers or {}).get("x-delivery-count", 0)
        return int(returned if isinstance(returned, int) else 0) + 1

    async def ack(self) -> None:
        self._settle()
        await self._message.ack()

    async def nak(self, delay_s: float = 0.0) -> None:
        self._settle()
        if delay_s <= 0:
            await self._message.reject(requeue=True)
            return
        # RabbitMQ has no per-message redelivery delay: hold the message (it stays unacked, so no
        # one else gets it) and requeue it when the delay is over. With prefetch 1 this consumer
        # takes nothing else meanwhile; if its channel closes first the broker requeues it anyway.
        task = asyncio.create_task(self._requeue_after(delay_s))
        self._delays.add(task)
        task.add_done_callback(self._delays.discard)

    async def in_progress(self) -> None:
        # Nothing to extend: RabbitMQ redelivers on channel loss, not on a timer.
        self._require_unsettled()

    async def term(self) -> None:
        self._settle()
        await self._message.reject(requeue=False)  # → the dead-letter exchange

    async def _requeue_after(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        with suppress(Exception):  # channel gone: the broker has requeued it already
            await self._message.reject(requeue=True)


class AmqpBus:
    """The Bus protocol on RabbitMQ; build it with ``await AmqpBus.connect(url, options)``."""

    def __init__(self, connection: AbstractRobustConnection, channel: AbstractChannel, options: BusOptions) -> None:
        self.options = options
        self._connection = connection
        self._channel = channel  # publishing (with confirms) and declaring
        self._names = AmqpNames(options.namespace)
        self._command_queues: set[str] = set()

    @classmethod
    async def connect(cls, url: str, options: BusOptions) -> AmqpBus:
        names = AmqpNames(checked_token(options.namespace, "namespace"))
        # Robust: reconnects after a broker restart and re-declares what it had declared.
        connection = await aio_pika.connect_robust(
            url, client_properties={"connection_name": f"imagebus-{options.namespace}"}
        )
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            await declare_topology(channel, names, options)
        except BaseException:
            await connection.close()
            raise
        return cls(connection, channel, options)

    async def close(self) -> None:
        await self._connection.close()

    # --- publishing ---------------------------------------------------------------------------

    async def publish_command(self, command: GenerateImage) -> None:
        backend = checked_token(command.queue, "queue")
        if backend not in self._command_queues:
            # Declared here too, so commands published before any worker started are kept.
            await declare_command_queue(self._channel, self._names, self.options, backend)
            self._command_queues.add(backend)
        await self._publish(self._names.commands_exchange, _message(command, persistent=True), backend)

    async def publish_event(self, event: Event) -> None:
        key = self._names.evt_key(event.type, checked_token(event.job_id, "job_id"))
        await self._publish(self._names.events_exchange, _message(event, persistent=True), key)

    async def publish_control(self, control: CancelJob) -> None:
        key = self._names.ctl_key(checked_token(control.backend, "backend"))
        # Not mandatory: with no live worker of the backend there is simply no one to tell.
        await self._publish(self._names.control_exchange, _message(control, persistent=False), key, mandatory=False)

    async def _publish(
        self, exchange: str, message: aio_pika.Message, routing_key: str, *, mandatory: bool = True
    ) -> None:
        # Returns after the broker's confirm (the channel has publisher confirms on); an
        # unroutable mandatory message raises instead of vanishing.
        target = await self._channel.get_exchange(exchange, ensure=False)
        await target.publish(message, routing_key=routing_key, mandatory=mandatory)

    # --- commands -----------------------------------------------------------------------------

    @asynccontextmanager
    async def consume_commands(
        self, backend: str, *, idle_timeout_s: float | None = None, prefetch: int = 1
    ) -> AsyncIterator[AsyncIterator[CommandDelivery]]:
        backend = checked_token(backend, "backend")
        # A channel of our own: prefetch is per channel, and closing it hands back what we hold.
        channel = await self._connection.channel(publisher_confirms=False)
        delays: set[asyncio.Task[None]] = set()
        try:
            await channel.set_qos(prefetch_count=max(1, prefetch))
            queue = await declare_command_queue(channel, self._names, self.options, backend)
            inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
            await queue.consume(inbox.put)

            async def deliveries() -> AsyncGenerator[CommandDelivery, None]:
                while (message := await _next(inbox, idle_timeout_s)) is not None:
                    command = decoded_or_none(decode_command, message.body, f"in {queue.name} (dead-lettered)")
                    if command is None:
                        await message.reject(requeue=False)
                        continue
                    yield _AmqpDelivery(message, command, delays)

            async with aclosing(deliveries()) as iterator:
                yield iterator
        finally:
            for task in list(delays):
                task.cancel()
            # Unacked deliveries (unsettled ones, held naks) go back to the queue right away.
            await channel.close()

    async def command_backlog(self, backend: str) -> int:
        name = self._names.cmd_queue(checked_token(backend, "backend"))
        # Its own channel: a passive declare of a missing queue closes the channel it runs on.
        channel = await self._connection.channel(publisher_confirms=False)
        try:
            queue = await channel.declare_queue(name, passive=True)
            return int(queue.declaration_result.message_count or 0)
        except ChannelNotFoundEntity:
            return 0
        finally:
            with suppress(Exception):
                await channel.close()

    # --- events -------------------------------------------------------------------------------

    @asynccontextmanager
    async def read_events(
        self, *, after: int | None = None, idle_timeout_s: float | None = None
    ) -> AsyncIterator[AsyncIterator[LoggedEvent]]:
        channel = await self._connection.channel(publisher_confirms=False)
        try:
            await channel.set_qos(prefetch_count=_EVENT_PREFETCH)
            stream = await declare_events_log(channel, self._names, self.options)
            inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
            # Position = stream offset + 1, so positions start at 1 as on the other buses and
            # "after p" is offset p.
            start: int | str = after if after else "first"
            await stream.consume(inbox.put, arguments={"x-stream-offset": start})

            async def events() -> AsyncGenerator[LoggedEvent, None]:
                last = after or 0
                while (message := await _next(inbox, idle_timeout_s)) is not None:
                    await message.ack()  # returns credit; a stream keeps the message regardless
                    position = _stream_offset(message) + 1
                    # The broker may start at the beginning of the chunk holding the offset, and a
                    # reconnect re-consumes from the original offset: skip what we have passed.
                    if position <= last:
                        continue
                    last = position
                    if (event := decoded_or_none(decode_event, message.body, f"at {position} (skipped)")) is not None:
                        yield LoggedEvent(position=position, event=event)

            async with aclosing(events()) as iterator:
                yield iterator
        finally:
            await channel.close()

    def watch_events(self, job_id: str | None = None) -> AbstractAsyncContextManager[AsyncIterator[Event]]:
        key = self._names.evt_binding(None if job_id is None else checked_token(job_id, "job_id"))
        return self._watch(self._names.events_exchange, key, decode_event)

    def watch_control(self, backend: str) -> AbstractAsyncContextManager[AsyncIterator[CancelJob]]:
        key = self._names.ctl_key(checked_token(backend, "backend"))
        return self._watch(self._names.control_exchange, key, decode_control)

    @asynccontextmanager
    async def _watch(self, exchange: str, key: str, decode: Callable[[bytes], _T]) -> AsyncIterator[AsyncIterator[_T]]:
        """Live messages through a temporary queue, decoded; unreadable ones are logged and skipped."""
        async with self._live_queue(exchange, key) as inbox:

            async def decoded() -> AsyncGenerator[_T, None]:
                while True:
                    message = await inbox.get()
                    if (item := decoded_or_none(decode, message.body, f"with key {message.routing_key}")) is not None:
                        yield item

            async with aclosing(decoded()) as iterator:
                yield iterator

    @asynccontextmanager
    async def _live_queue(
        self, exchange: str, routing_key: str
    ) -> AsyncIterator[asyncio.Queue[AbstractIncomingMessage]]:
        """A server-named queue bound to ``exchange`` for as long as the context lasts."""
        channel = await self._connection.channel(publisher_confirms=False)
        try:
            # Exclusive + auto-delete: gone when we cancel, or when our connection dies.
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            await queue.bind(exchange, routing_key=routing_key)
            inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
            await queue.consume(inbox.put, no_ack=True)
            yield inbox
        finally:
            await channel.close()


# --- helpers ------------------------------------------------------------------------------------


def _message(message: Message, *, persistent: bool) -> aio_pika.Message:
    return aio_pika.Message(
        encode(message),
        content_type="application/json",
        message_id=message.message_id,
        type=message.type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT,
    )


async def _next(
    inbox: asyncio.Queue[AbstractIncomingMessage], idle_timeout_s: float | None
) -> AbstractIncomingMessage | None:
    try:
        return await asyncio.wait_for(inbox.get(), idle_timeout_s)
    except TimeoutError:
        return None


def _stream_offset(message: AbstractIncomingMessage) -> int:
    offset: Any = (message.headers or {}).get("x-stream-offset")
    return int(offset)
