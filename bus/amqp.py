"""AMQP 0.9.1 adapter for RabbitMQ (3.10+).

Commands: a direct exchange routing to one quorum queue per backend, whose delivery limit and
dead-letter exchange bound the retries. Events: a topic exchange feeding a RabbitMQ stream (the
durable log, read from any offset) and, for live watchers, server-named exclusive queues. Live-only
events (per-step progress): a non-durable topic exchange bound to the watchers' queues only,
transient messages on a channel without confirms. Control: a topic exchange with one exclusive
queue per watcher. Every name is prefixed by the namespace.

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
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager, suppress
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPConnectionError, AMQPError, ChannelInvalidStateError, ChannelNotFoundEntity

from bus._amqp_topology import declare_command_queue, declare_events_log, declare_live_exchange, declare_topology
from bus._decoding import decoded_or_none
from bus._delivery import SettleOnce
from bus._names import AmqpNames, checked_token
from bus.base import BusOptions, CommandDelivery, LoggedEvent
from bus.tracing import carried, trace_headers
from schemas import CancelJob, Event, GenerateImage, Message, decode_command, decode_control, decode_event, encode

log = structlog.get_logger(__name__)

# Stream consumers need a prefetch (credit); acks return it.
_EVENT_PREFETCH = 200
# How long a publish waits for a lost connection to come back (the broker restarting) before it
# raises, and the pause between tries.
_PUBLISH_PATIENCE_S = 20.0
_PUBLISH_RETRY_DELAY_S = 0.25
_RECONNECT_INTERVAL_S = 1.0
_MAX_SET_UP_PAUSE_S = 5.0


_T = TypeVar("_T")

# The shortest AMQP heartbeat we ask for: shorter ones drop busy-but-alive processes.
_MIN_HEARTBEAT_S = 10


def _with_heartbeat(url: str, options: BusOptions) -> str:
    """``url`` asking for an AMQP heartbeat near ``ack_wait_s`` unless it names one itself.

    RabbitMQ redelivers a held message only when its consumer's connection dies, and notices a
    frozen or partitioned process by the missed heartbeats (the server default waits 60 s twice).
    Tying the heartbeat to the ack wait gives a stalled worker's jobs to another worker in about
    the time NATS takes to do the same.
    """
    parts = urlsplit(url)
    if "heartbeat" in parse_qs(parts.query):
        return url
    heartbeat = max(round(options.ack_wait_s), _MIN_HEARTBEAT_S)
    query = f"{parts.query}&heartbeat={heartbeat}" if parts.query else f"heartbeat={heartbeat}"
    return urlunsplit(parts._replace(query=query))


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

    @property
    def trace_headers(self) -> Mapping[str, str]:
        return carried(self._message.headers)

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

    def __init__(
        self,
        connection: AbstractRobustConnection,
        channel: AbstractChannel,
        live_channel: AbstractChannel,
        options: BusOptions,
    ) -> None:
        self.options = options
        self._connection = connection
        self._channel = channel  # publishing (with confirms) and declaring
        self._live_channel = live_channel  # live-only events: no confirms to wait for
        self._names = AmqpNames(options.namespace)
        self._command_queues: set[str] = set()

    @classmethod
    async def connect(cls, url: str, options: BusOptions) -> AmqpBus:
        names = AmqpNames(checked_token(options.namespace, "namespace"))
        # Robust: reconnects after a broker restart and re-declares what it had declared. It tries
        # every second (aio-pika's default is 5 s), as the NATS adapter does.
        connection = await aio_pika.connect_robust(
            _with_heartbeat(url, options),
            client_properties={"connection_name": f"imagebus-{options.namespace}"},
            reconnect_interval=_RECONNECT_INTERVAL_S,
        )
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            await declare_topology(channel, names, options)
            # Declared through the channel that publishes to it, so its reconnect re-declares it.
            live_channel = await connection.channel(publisher_confirms=False)
            await declare_live_exchange(live_channel, names)
        except ChannelNotFoundEntity as err:
            # A node still starting answers the declare of a durable queue it has not recovered
            # yet with NOT_FOUND ("home node ... is down or inaccessible"): not ready, try again.
            await connection.close()
            raise ConnectionError(f"RabbitMQ is not ready yet: {err}") from err
        except BaseException:
            await connection.close()
            raise
        return cls(connection, channel, live_channel, options)

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
        if event.live_only:
            await self._publish_live(event, key)
            return
        await self._publish(self._names.events_exchange, _message(event, persistent=True), key)

    async def _publish_live(self, event: Event, routing_key: str) -> None:
        # No confirm, no retry through a reconnect: a step that cannot be sent now is of no use
        # later. Not mandatory: with no one watching there is no one to tell.
        if self._connection.is_closed or not self._connection.connected.is_set():
            return
        exchange = await self._live_channel.get_exchange(self._names.live_exchange, ensure=False)
        await exchange.publish(_message(event, persistent=False), routing_key=routing_key, mandatory=False)

    async def publish_control(self, control: CancelJob) -> None:
        key = self._names.ctl_key(checked_token(control.backend, "backend"))
        # Not mandatory: with no live worker of the backend there is simply no one to tell.
        await self._publish(self._names.control_exchange, _message(control, persistent=False), key, mandatory=False)

    async def _publish(
        self, exchange: str, message: aio_pika.Message, routing_key: str, *, mandatory: bool = True
    ) -> None:
        # Returns after the broker's confirm (the channel has publisher confirms on); an
        # unroutable mandatory message raises instead of vanishing. While the connection is down
        # (a broker restart) it waits for the robust connection to come back and tries again; a
        # try whose confirm was lost may then be stored twice, which every consumer tolerates.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _PUBLISH_PATIENCE_S
        while True:
            try:
                target = await self._channel.get_exchange(exchange, ensure=False)
                await target.publish(message, routing_key=routing_key, mandatory=mandatory)
                return
            except (ChannelInvalidStateError, AMQPConnectionError) as err:
                if self._connection.is_closed or loop.time() + _PUBLISH_RETRY_DELAY_S >= deadline:
                    raise
                log.warning("amqp_publish_retry", exchange=exchange, error=repr(err))
                await asyncio.sleep(_PUBLISH_RETRY_DELAY_S)
                if isinstance(self._channel, AbstractRobustChannel):
                    with suppress(TimeoutError):
                        async with asyncio.timeout(max(deadline - loop.time(), 0.0)):
                            await self._channel.ready()

    async def _consumer_channel(self, set_up: Callable[[AbstractChannel], Awaitable[_T]]) -> tuple[AbstractChannel, _T]:
        """A channel of its own for a consumer, with ``set_up`` run on it (qos, declares, consume).

        While the connection is down, or back on a node still recovering its queues (a broker
        restart), it waits and tries again for as long as that takes, as the consumers already
        set up do: a role that starts one during an outage rides the outage out.
        """
        pause = _PUBLISH_RETRY_DELAY_S
        while True:
            channel: AbstractChannel | None = None
            try:
                channel = await self._connection.channel(publisher_confirms=False)
                return channel, await set_up(channel)
            except (RuntimeError, AMQPConnectionError, ChannelNotFoundEntity) as err:
                if channel is not None:
                    with suppress(Exception):
                        await channel.close()
                # NOT_FOUND is what a starting node answers for a durable queue it has not recovered
                # yet; a plain RuntimeError ("Connection was not opened") counts while reconnecting.
                plain = type(err) is RuntimeError
                if self._connection.is_closed or (plain and self._connection.connected.is_set()):
                    raise
                log.warning("amqp_consumer_waiting", error=repr(err), retry_in_s=pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, _MAX_SET_UP_PAUSE_S)
                await self._connection.ready()

    # --- commands -----------------------------------------------------------------------------

    @asynccontextmanager
    async def consume_commands(
        self, backend: str, *, idle_timeout_s: float | None = None, prefetch: int = 1
    ) -> AsyncIterator[AsyncIterator[CommandDelivery]]:
        backend = checked_token(backend, "backend")
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        # One at a time until a first-time command shows up; see _fitting_prefetch.
        prefetch_now = 1

        async def set_up(channel: AbstractChannel) -> AbstractQueue:
            await channel.set_qos(prefetch_count=prefetch_now)
            queue = await declare_command_queue(channel, self._names, self.options, backend)
            await queue.consume(inbox.put)
            return queue

        # A channel of our own: prefetch is per channel, and closing it hands back what we hold.
        channel, queue = await self._consumer_channel(set_up)
        delays: set[asyncio.Task[None]] = set()
        try:
            held: list[_AmqpDelivery] = []

            async def deliveries() -> AsyncGenerator[CommandDelivery, None]:
                nonlocal prefetch_now
                while (message := await _next(inbox, idle_timeout_s)) is not None:
                    if _taken_back(message):
                        continue
                    command = decoded_or_none(decode_command, message.body, f"in {queue.name} (dead-lettered)")
                    if command is None:
                        await message.reject(requeue=False)
                        continue
                    delivery = _AmqpDelivery(message, command, delays)
                    held[:] = [d for d in held if not d.settled] + [delivery]
                    wanted = _fitting_prefetch(held, prefetch)
                    if wanted != prefetch_now:
                        await channel.set_qos(prefetch_count=wanted)
                        prefetch_now = wanted
                    yield delivery

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
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

        async def set_up(channel: AbstractChannel) -> None:
            await channel.set_qos(prefetch_count=_EVENT_PREFETCH)
            stream = await declare_events_log(channel, self._names, self.options)
            # Position = stream offset + 1, so positions start at 1 as on the other buses and
            # "after p" is offset p.
            start: int | str = after if after else "first"
            await stream.consume(inbox.put, arguments={"x-stream-offset": start})

        channel, _ = await self._consumer_channel(set_up)
        try:

            async def events() -> AsyncGenerator[LoggedEvent, None]:
                last = after or 0
                while (message := await _next(inbox, idle_timeout_s)) is not None:
                    # Returns credit; a stream keeps the message regardless. One received before a
                    # reconnect has no channel left to ack on, and needs none.
                    with suppress(ChannelInvalidStateError, AMQPError):
                        await message.ack()
                    position = _stream_offset(message) + 1
                    # The broker may start at the beginning of the chunk holding the offset, and a
                    # reconnect re-consumes from the original offset: skip what we have passed.
                    if position <= last:
                        continue
                    last = position
                    if (event := decoded_or_none(decode_event, message.body, f"at {position} (skipped)")) is not None:
                        yield LoggedEvent(position=position, event=event, trace_headers=carried(message.headers))

            async with aclosing(events()) as iterator:
                yield iterator
        finally:
            await channel.close()

    def watch_events(self, job_id: str | None = None) -> AbstractAsyncContextManager[AsyncIterator[Event]]:
        key = self._names.evt_binding(None if job_id is None else checked_token(job_id, "job_id"))
        # One queue bound to both: the durable events' live copies and the live-only events.
        return self._watch(((self._names.events_exchange, key), (self._names.live_exchange, key)), decode_event)

    def watch_control(self, backend: str) -> AbstractAsyncContextManager[AsyncIterator[CancelJob]]:
        key = self._names.ctl_key(checked_token(backend, "backend"))
        return self._watch(((self._names.control_exchange, key),), decode_control)

    @asynccontextmanager
    async def _watch(
        self, bindings: tuple[tuple[str, str], ...], decode: Callable[[bytes], _T]
    ) -> AsyncIterator[AsyncIterator[_T]]:
        """Live messages through a temporary queue, decoded; unreadable ones are logged and skipped."""
        async with self._live_queue(bindings) as inbox:

            async def decoded() -> AsyncGenerator[_T, None]:
                while True:
                    message = await inbox.get()
                    if (item := decoded_or_none(decode, message.body, f"with key {message.routing_key}")) is not None:
                        yield item

            async with aclosing(decoded()) as iterator:
                yield iterator

    @asynccontextmanager
    async def _live_queue(
        self, bindings: tuple[tuple[str, str], ...]
    ) -> AsyncIterator[asyncio.Queue[AbstractIncomingMessage]]:
        """A server-named queue bound to each (exchange, routing key) for as long as the context lasts."""
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

        async def set_up(channel: AbstractChannel) -> None:
            if any(exchange == self._names.live_exchange for exchange, _ in bindings):
                # Not durable: after a broker restart this channel may come back before any
                # publisher's, and binding to a missing exchange would close it.
                await declare_live_exchange(channel, self._names)
            # Exclusive + auto-delete: gone when we cancel, or when our connection dies.
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            for exchange, routing_key in bindings:
                await queue.bind(exchange, routing_key=routing_key)
            await queue.consume(inbox.put, no_ack=True)

        channel, _ = await self._consumer_channel(set_up)
        try:
            yield inbox
        finally:
            await channel.close()


# --- helpers ------------------------------------------------------------------------------------


def _message(message: Message, *, persistent: bool) -> aio_pika.Message:
    return aio_pika.Message(
        encode(message),
        headers=dict(trace_headers()),
        content_type="application/json",
        message_id=message.message_id,
        type=message.type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT,
    )


def _fitting_prefetch(held: list[_AmqpDelivery], prefetch: int) -> int:
    """What the broker may push to this consumer now: one while a redelivered command is held.

    RabbitMQ pushes up to the prefetch ahead, and everything pushed goes back, one delivery
    counted, when the process dies. A redelivered command may be one that kills its worker, so
    while it is held nothing else is taken, and no innocent command is charged for its crash.
    (Workers hold it alone too; on NATS, which hands out only what is pulled, that suffices.)
    """
    if any(delivery.attempt > 1 for delivery in held):
        return 1
    return max(1, prefetch)


async def _next(
    inbox: asyncio.Queue[AbstractIncomingMessage], idle_timeout_s: float | None
) -> AbstractIncomingMessage | None:
    try:
        return await asyncio.wait_for(inbox.get(), idle_timeout_s)
    except TimeoutError:
        return None


def _taken_back(message: AbstractIncomingMessage) -> bool:
    """Received on a channel that has closed since (a lost connection): the broker has put the
    message back in its queue and delivers it again, so this copy must not run."""
    try:
        message.channel  # noqa: B018 (raises once the channel is closed)
    except ChannelInvalidStateError:
        return True
    return False


def _stream_offset(message: AbstractIncomingMessage) -> int:
    offset: Any = (message.headers or {}).get("x-stream-offset")
    return int(offset)
