"""NATS JetStream adapter.

Commands live on a work-queue stream read through one durable pull consumer per backend, events
on a limits stream (the durable log), and live events and cancels ride core NATS subjects, which
also see every JetStream publish. Live-only events (per-step progress) are core NATS publishes on
``<ns>.live.<type>.<job>``, outside every stream's subjects: never stored, never acked. Every
stream, subject and consumer is prefixed by the namespace.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager, suppress
from typing import TypeVar

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionReconnectingError, OutboundBufferLimitError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NoStreamResponseError, NotFoundError, ServiceUnavailableError

from bus._decoding import decoded_or_none
from bus._delivery import SettleOnce
from bus._names import NatsNames, checked_token
from bus._nats_pull import EventReader, nak_stragglers, pull_one, unsubscribe, withdraw_pull
from bus.base import BusOptions, CommandDelivery, LoggedEvent
from bus.tracing import carried, trace_headers
from schemas import CancelJob, Event, GenerateImage, decode_command, decode_control, decode_event, encode

log = structlog.get_logger(__name__)

_DUPLICATE_WINDOW_S = 120.0
_CONNECT_TIMEOUT_S = 10.0
# How long a JetStream publish keeps trying through a reconnect (the server restarting, JetStream
# restoring its streams) before it raises; each try waits up to _PUBLISH_TRY_S for the stored-ack.
_PUBLISH_PATIENCE_S = 20.0
_PUBLISH_TRY_S = 5.0
_PUBLISH_RETRY_DELAY_S = 0.25
# What a publish meets while the server is away or coming back; anything else is not retried.
_PUBLISH_TRANSIENT = (
    NatsTimeoutError,
    NoStreamResponseError,
    ServiceUnavailableError,
    ConnectionReconnectingError,
    OutboundBufferLimitError,
)
# Commands held across all workers at once (each holds up to its prefetch); a bound, not a target.
_MAX_ACK_PENDING = 10_000
# JetStream error code: "stream name already in use with a different configuration".
_STREAM_NAME_IN_USE = 10058


_T = TypeVar("_T")


class _NatsDelivery(SettleOnce):
    def __init__(self, msg: Msg, command: GenerateImage, nc: Client, js: JetStreamContext, names: NatsNames) -> None:
        self._msg = msg
        self._command = command
        self._nc = nc
        self._js = js
        self._names = names
        super().__init__()

    @property
    def command(self) -> GenerateImage:
        return self._command

    @property
    def attempt(self) -> int:
        return self._msg.metadata.num_delivered

    @property
    def trace_headers(self) -> Mapping[str, str]:
        return carried(self._msg.headers)

    async def ack(self) -> None:
        self._settle()
        # Not flushed (a PING/PONG round trip per job): publishing wakes nats-py's flusher, which
        # writes the ack on the next turn of the loop, and close() writes what is left. An ack lost
        # with a dying process only means a redelivery, which changes nothing visible.
        await self._msg.ack()

    async def nak(self, delay_s: float = 0.0) -> None:
        self._settle()
        await self._msg.nak(delay=delay_s if delay_s > 0 else None)
        await self._nc.flush()

    async def in_progress(self) -> None:
        self._require_unsettled()
        await self._msg.in_progress()

    async def term(self) -> None:
        # JetStream has no dead-letter queue: a terminated message is dropped (and announced on
        # $JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.<stream>.<consumer>). Copy it to the DEAD
        # stream first, so an operator can still read what was given up on.
        self._settle()
        await self._js.publish(
            self._names.dead_subject(self._command.queue),
            self._msg.data,
            stream=self._names.dead_stream,
            headers={"Nats-Msg-Id": self._command.message_id},
        )
        await self._msg.term()
        await self._nc.flush()


def _kept_stream(name: str, subjects: str, options: BusOptions) -> api.StreamConfig:
    """A stream that keeps what it stores for the retention time (the event log, the dead letters)."""
    return api.StreamConfig(
        name=name,
        subjects=[subjects],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        max_age=options.event_retention_s,
        # The server refuses a duplicate window longer than max_age.
        duplicate_window=min(_DUPLICATE_WINDOW_S, options.event_retention_s),
        num_replicas=options.replicas or 1,
    )


class NatsBus:
    """The Bus protocol on NATS JetStream; build it with ``await NatsBus.connect(url, options)``."""

    def __init__(self, nc: Client, js: JetStreamContext, options: BusOptions) -> None:
        self.options = options
        self._nc = nc
        self._js = js
        self._names = NatsNames(options.namespace)

    @classmethod
    async def connect(cls, url: str, options: BusOptions) -> NatsBus:
        names = NatsNames(checked_token(options.namespace, "namespace"))
        nc = Client()

        async def disconnected() -> None:
            if not nc.is_closed:  # also called by our own close()
                log.warning("nats_disconnected")

        async def reconnected() -> None:
            log.info("nats_reconnected")

        async def failed(err: Exception) -> None:
            log.warning("nats_connection_error", error=str(err))

        try:
            # Once connected, reconnect for as long as the process lives (a NATS restart is
            # routine); but fail a first connection that cannot be made, so a wrong URL is seen.
            async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                await nc.connect(
                    url,
                    name=f"imagebus-{options.namespace}",
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    error_cb=failed,
                    disconnected_cb=disconnected,
                    reconnected_cb=reconnected,
                )
        except TimeoutError:
            await nc.close()
            raise ConnectionError(f"no NATS server reachable within {_CONNECT_TIMEOUT_S:.0f} s") from None
        try:
            js = nc.jetstream()
            await _ensure_stream(
                js,
                api.StreamConfig(
                    name=names.cmd_stream,
                    subjects=[names.cmd_subjects],
                    retention=api.RetentionPolicy.WORK_QUEUE,
                    storage=api.StorageType.FILE,
                    duplicate_window=_DUPLICATE_WINDOW_S,
                    num_replicas=options.replicas or 1,
                ),
                options.replicas,
            )
            for kept in (
                _kept_stream(names.dead_stream, names.dead_subjects, options),
                _kept_stream(names.evt_stream, names.evt_subjects, options),
            ):
                await _ensure_stream(js, kept, options.replicas)
        except BaseException:
            await nc.close()
            raise
        return cls(nc, js, options)

    async def close(self) -> None:
        # close(), not drain(): every subscription is already ended by its context, and drain()
        # stalls for its whole timeout after a pull fetch has timed out.
        await self._nc.close()

    # --- publishing ---------------------------------------------------------------------------

    async def publish_command(self, command: GenerateImage) -> None:
        subject = self._names.cmd_subject(checked_token(command.queue, "queue"))
        await publish_durably(self._nc, self._js, subject, encode(command), self._names.cmd_stream, command.message_id)

    async def publish_event(self, event: Event) -> None:
        job_id = checked_token(event.job_id, "job_id")
        if event.live_only:
            # Live data: nobody wants a step late, so none is buffered for after a reconnect.
            if self._nc.is_connected:
                await self._nc.publish(
                    self._names.live_subject(event.type, job_id), encode(event), headers=trace_headers() or None
                )
            return
        subject = self._names.evt_subject(event.type, job_id)
        await publish_durably(self._nc, self._js, subject, encode(event), self._names.evt_stream, event.message_id)

    async def publish_control(self, control: CancelJob) -> None:
        await self._nc.publish(self._names.ctl_subject(checked_token(control.backend, "backend")), encode(control))
        await self._nc.flush()

    # --- commands -----------------------------------------------------------------------------

    @asynccontextmanager
    async def consume_commands(
        self, backend: str, *, idle_timeout_s: float | None = None, prefetch: int = 1
    ) -> AsyncIterator[AsyncIterator[CommandDelivery]]:
        consumer = self._names.worker_consumer(checked_token(backend, "backend"))
        # Create or update, so changed options (ack wait, max deliveries) reach an existing consumer.
        await self._js.add_consumer(
            self._names.cmd_stream,
            api.ConsumerConfig(
                name=consumer,
                durable_name=consumer,
                filter_subject=self._names.cmd_subject(backend),
                deliver_policy=api.DeliverPolicy.ALL,
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=self.options.ack_wait_s,
                max_deliver=self.options.delivery_limit,
                max_ack_pending=_MAX_ACK_PENDING,
            ),
        )
        sub = await self._js.pull_subscribe_bind(consumer, stream=self._names.cmd_stream)
        unsettled: list[_NatsDelivery] = []

        async def deliveries() -> AsyncGenerator[CommandDelivery, None]:
            try:
                while (msg := await pull_one(sub, idle_timeout_s)) is not None:
                    command = decoded_or_none(decode_command, msg.data, f"on {msg.subject} (terminated)")
                    if command is None:
                        await msg.term()
                        continue
                    delivery = _NatsDelivery(msg, command, self._nc, self._js, self._names)
                    unsettled[:] = [d for d in unsettled if not d.settled] + [delivery]
                    yield delivery
            except asyncio.CancelledError:
                # The caller stopped waiting for the next command (a worker stopping). Withdraw
                # our pull request before it hands back the commands it holds: left open, the
                # request would take them straight back, and each would cost one more delivery.
                await withdraw_pull(sub, self._nc)
                raise

        try:
            async with aclosing(deliveries()) as iterator:
                yield iterator
        finally:
            # Hand back what the caller left unsettled now rather than after ack_wait.
            for delivery in unsettled:
                if not delivery.settled:
                    with suppress(Exception):
                        await delivery.nak()
            await nak_stragglers(sub, self._nc)
            await unsubscribe(sub)

    async def command_backlog(self, backend: str) -> int:
        backend = checked_token(backend, "backend")
        if not self._nc.is_connected:
            # The server is away: say so now rather than after a request timeout.
            raise ConnectionError("not connected to the NATS server")
        try:
            info = await self._js.consumer_info(self._names.cmd_stream, self._names.worker_consumer(backend))
        except NotFoundError:
            # No worker has started yet: everything stored for the backend is waiting.
            subject = self._names.cmd_subject(backend)
            stream = await self._js.stream_info(self._names.cmd_stream, subjects_filter=subject)
            return (stream.state.subjects or {}).get(subject, 0)
        return (info.num_pending or 0) + (info.num_ack_pending or 0)

    # --- events -------------------------------------------------------------------------------

    @asynccontextmanager
    async def read_events(
        self, *, after: int | None = None, idle_timeout_s: float | None = None
    ) -> AsyncIterator[AsyncIterator[LoggedEvent]]:
        reader = EventReader(self._js, self._nc, self._names, after)
        await reader.open()

        async def events() -> AsyncGenerator[LoggedEvent, None]:
            while batch := await reader.next_batch(idle_timeout_s):
                for msg in batch:
                    position = msg.metadata.sequence.stream
                    if (event := decoded_or_none(decode_event, msg.data, f"at {position} (skipped)")) is not None:
                        yield LoggedEvent(position=position, event=event, trace_headers=carried(msg.headers))

        try:
            async with aclosing(events()) as iterator:
                yield iterator
        finally:
            await reader.close()

    def watch_events(self, job_id: str | None = None) -> AbstractAsyncContextManager[AsyncIterator[Event]]:
        job_id = None if job_id is None else checked_token(job_id, "job_id")
        return self._watch((self._names.evt_watch(job_id), self._names.live_watch(job_id)), decode_event)

    def watch_control(self, backend: str) -> AbstractAsyncContextManager[AsyncIterator[CancelJob]]:
        return self._watch((self._names.ctl_subject(checked_token(backend, "backend")),), decode_control)

    @asynccontextmanager
    async def _watch(
        self, subjects: tuple[str, ...], decode: Callable[[bytes], _T]
    ) -> AsyncIterator[AsyncIterator[_T]]:
        """Live messages on core subjects, decoded; unreadable ones are logged and skipped."""
        async with self._core_subscription(subjects) as messages:

            async def decoded() -> AsyncGenerator[_T, None]:
                async for msg in messages:
                    if (message := decoded_or_none(decode, msg.data, f"on {msg.subject}")) is not None:
                        yield message

            async with aclosing(decoded()) as iterator:
                yield iterator

    @asynccontextmanager
    async def _core_subscription(self, subjects: tuple[str, ...]) -> AsyncIterator[AsyncIterator[Msg]]:
        """One stream of the messages of several subscriptions, in the order they are handed over."""
        inbox: asyncio.Queue[Msg] = asyncio.Queue()

        async def receive(msg: Msg) -> None:
            inbox.put_nowait(msg)

        async def messages() -> AsyncGenerator[Msg, None]:
            while True:
                yield await inbox.get()

        subs = []
        try:
            for subject in subjects:
                subs.append(await self._nc.subscribe(subject, cb=receive))
            # Round trip so the server has registered the interest before the caller publishes.
            await self._nc.flush()
            async with aclosing(messages()) as iterator:
                yield iterator
        finally:
            for sub in subs:
                with suppress(Exception):
                    await sub.unsubscribe()


# --- helpers ------------------------------------------------------------------------------------


async def publish_durably(
    nc: Client, js: JetStreamContext, subject: str, payload: bytes, stream: str, msg_id: str
) -> None:
    """Publish and wait for the stream's ack, riding out a reconnect for up to _PUBLISH_PATIENCE_S.

    A try whose ack was lost (the server went away after storing it) is tried again under the
    same Nats-Msg-Id, so the duplicate window stores it once. Nothing is handed to the client while
    it is disconnected: nats-py would buffer it and send it on reconnect, after we gave up and told
    our caller it failed. The last error is raised if the server is still away after that long.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _PUBLISH_PATIENCE_S
    error: Exception = ConnectionError("not connected to the NATS server")
    headers = {**trace_headers(), api.Header.MSG_ID: msg_id}
    while True:
        if nc.is_connected:
            try:
                await js.publish(subject, payload, timeout=_PUBLISH_TRY_S, stream=stream, headers=headers)
                return
            except _PUBLISH_TRANSIENT as err:
                error = err
                log.warning("nats_publish_retry", subject=subject, error=repr(err))
        if loop.time() + _PUBLISH_RETRY_DELAY_S >= deadline:
            raise error
        await asyncio.sleep(_PUBLISH_RETRY_DELAY_S)


async def _ensure_stream(js: JetStreamContext, config: api.StreamConfig, replicas: int | None) -> None:
    """Create the stream, or bring an existing one to our subjects, age and window, and to
    ``replicas`` when that is set (None: an existing stream keeps the replicas it has)."""
    try:
        await js.add_stream(config)
    except BadRequestError as err:
        if err.err_code != _STREAM_NAME_IN_USE:
            raise
        # It exists with other settings: update only what we own, keeping what an operator tuned
        # (replicas, placement, limits).
        assert config.name is not None
        current = (await js.stream_info(config.name)).config
        wanted = current.evolve(
            subjects=config.subjects,
            max_age=config.max_age,
            duplicate_window=config.duplicate_window,
            num_replicas=replicas or current.num_replicas,
        )
        if wanted != current:
            await js.update_stream(wanted)
