"""NATS JetStream adapter.

Commands live on a work-queue stream read through one durable pull consumer per backend, events
on a limits stream (the durable log), and live events and cancels ride core NATS subjects, which
also see every JetStream publish. Every stream, subject and consumer is prefixed by the namespace.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager, suppress

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, BadRequestError, NotFoundError
from pydantic import ValidationError

from bus._names import NatsNames, checked_token
from bus.base import BusOptions, CommandDelivery, LoggedEvent
from schemas import CancelJob, Event, GenerateImage, decode_command, decode_control, decode_event, encode

log = logging.getLogger(__name__)

_DUPLICATE_WINDOW_S = 120.0
_CONNECT_TIMEOUT_S = 10.0
# Length of one long-poll pull request when no idle timeout bounds it: short enough that a
# request left behind on the server by a cancelled fetch expires soon.
_FETCH_WAIT_S = 5.0
_MIN_FETCH_WAIT_S = 0.01
_EVENT_BATCH = 256
# Every worker holds at most one command, so this only has to exceed the number of workers.
_MAX_ACK_PENDING = 10_000
# The server deletes a reader's ephemeral consumer after this long without pulls (a crashed reader).
_READER_INACTIVE_S = 60.0
_CLEANUP_TIMEOUT_S = 1.0
# JetStream error code: "stream name already in use with a different configuration".
_STREAM_NAME_IN_USE = 10058


class _NatsDelivery:
    def __init__(self, msg: Msg, command: GenerateImage, nc: Client) -> None:
        self._msg = msg
        self._command = command
        self._nc = nc
        self.settled = False

    @property
    def command(self) -> GenerateImage:
        return self._command

    @property
    def attempt(self) -> int:
        return self._msg.metadata.num_delivered

    async def ack(self) -> None:
        self._settle()
        await self._msg.ack()
        # Flushed so that "returned" means the server has it, not just our write buffer.
        await self._nc.flush()

    async def nak(self, delay_s: float = 0.0) -> None:
        self._settle()
        await self._msg.nak(delay=delay_s if delay_s > 0 else None)
        await self._nc.flush()

    async def in_progress(self) -> None:
        if self.settled:
            raise RuntimeError("in_progress() on a settled delivery")
        await self._msg.in_progress()

    async def term(self) -> None:
        # JetStream has no dead-letter queue: a terminated message is dropped and announced on
        # $JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.<stream>.<consumer>.
        self._settle()
        await self._msg.term()
        await self._nc.flush()

    def _settle(self) -> None:
        if self.settled:
            raise RuntimeError("delivery already settled")
        self.settled = True


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
                log.warning("disconnected from NATS; reconnecting")

        async def reconnected() -> None:
            log.info("reconnected to NATS")

        async def failed(err: Exception) -> None:
            log.warning("NATS connection error: %s", err)

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
                ),
            )
            await _ensure_stream(
                js,
                api.StreamConfig(
                    name=names.evt_stream,
                    subjects=[names.evt_subjects],
                    retention=api.RetentionPolicy.LIMITS,
                    storage=api.StorageType.FILE,
                    max_age=options.event_retention_s,
                    # The server refuses a duplicate window longer than max_age.
                    duplicate_window=min(_DUPLICATE_WINDOW_S, options.event_retention_s),
                ),
            )
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
        subject = self._names.cmd_subject(checked_token(command.backend, "backend"))
        await self._js.publish(
            subject,
            encode(command),
            stream=self._names.cmd_stream,
            headers={api.Header.MSG_ID: command.message_id},
        )

    async def publish_event(self, event: Event) -> None:
        subject = self._names.evt_subject(event.type, checked_token(event.job_id, "job_id"))
        await self._js.publish(
            subject,
            encode(event),
            stream=self._names.evt_stream,
            headers={api.Header.MSG_ID: event.message_id},
        )

    async def publish_control(self, control: CancelJob) -> None:
        await self._nc.publish(self._names.ctl_subject(checked_token(control.backend, "backend")), encode(control))
        await self._nc.flush()

    # --- commands -----------------------------------------------------------------------------

    @asynccontextmanager
    async def consume_commands(
        self, backend: str, *, idle_timeout_s: float | None = None
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
                max_deliver=self.options.max_deliveries,
                max_ack_pending=_MAX_ACK_PENDING,
            ),
        )
        sub = await self._js.pull_subscribe_bind(consumer, stream=self._names.cmd_stream)
        unsettled: list[_NatsDelivery] = []

        async def deliveries() -> AsyncGenerator[CommandDelivery, None]:
            while (msg := await _pull_one(sub, idle_timeout_s)) is not None:
                try:
                    command = decode_command(msg.data)
                except (ValidationError, ValueError):
                    log.exception("unreadable command on %s: terminated", msg.subject)
                    await msg.term()
                    continue
                delivery = _NatsDelivery(msg, command, self._nc)
                unsettled[:] = [d for d in unsettled if not d.settled] + [delivery]
                yield delivery

        try:
            async with aclosing(deliveries()) as iterator:
                yield iterator
        finally:
            # Hand back what the caller left unsettled now rather than after ack_wait.
            for delivery in unsettled:
                if not delivery.settled:
                    with suppress(Exception):
                        await delivery.nak()
            await _unsubscribe(sub)

    async def command_backlog(self, backend: str) -> int:
        backend = checked_token(backend, "backend")
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
        reader = _EventReader(self._js, self._names, after)
        await reader.open()

        async def events() -> AsyncGenerator[LoggedEvent, None]:
            while batch := await reader.next_batch(idle_timeout_s):
                for msg in batch:
                    try:
                        event = decode_event(msg.data)
                    except (ValidationError, ValueError):
                        log.exception("unreadable event at %d skipped", msg.metadata.sequence.stream)
                        continue
                    yield LoggedEvent(position=msg.metadata.sequence.stream, event=event)

        try:
            async with aclosing(events()) as iterator:
                yield iterator
        finally:
            await reader.close()

    @asynccontextmanager
    async def watch_events(self, job_id: str | None = None) -> AsyncIterator[AsyncIterator[Event]]:
        subject = self._names.evt_watch(None if job_id is None else checked_token(job_id, "job_id"))
        async with self._core_subscription(subject) as messages:

            async def events() -> AsyncGenerator[Event, None]:
                async for msg in messages:
                    try:
                        yield decode_event(msg.data)
                    except (ValidationError, ValueError):
                        log.exception("unreadable live event on %s skipped", msg.subject)

            async with aclosing(events()) as iterator:
                yield iterator

    @asynccontextmanager
    async def watch_control(self, backend: str) -> AsyncIterator[AsyncIterator[CancelJob]]:
        async with self._core_subscription(self._names.ctl_subject(checked_token(backend, "backend"))) as messages:

            async def controls() -> AsyncGenerator[CancelJob, None]:
                async for msg in messages:
                    try:
                        yield decode_control(msg.data)
                    except (ValidationError, ValueError):
                        log.exception("unreadable control message on %s skipped", msg.subject)

            async with aclosing(controls()) as iterator:
                yield iterator

    @asynccontextmanager
    async def _core_subscription(self, subject: str) -> AsyncIterator[AsyncIterator[Msg]]:
        sub = await self._nc.subscribe(subject)
        try:
            # Round trip so the server has registered the interest before the caller publishes.
            await self._nc.flush()
            yield sub.messages
        finally:
            with suppress(Exception):
                await sub.unsubscribe()


class _EventReader:
    """An ephemeral pull consumer over the event stream that restarts where it left off.

    Acks are off (a reader keeps its own position), so a batch lost in a reconnect shows up as a
    gap in the consumer sequence; the consumer is then re-created from the next stream sequence.
    """

    def __init__(self, js: JetStreamContext, names: NatsNames, after: int | None) -> None:
        self._js = js
        self._names = names
        self._next_seq = (after or 0) + 1
        self._consumer = ""
        self._consumer_seq = 0
        self._sub: JetStreamContext.PullSubscription | None = None

    async def open(self) -> None:
        self._consumer = f"{self._names.namespace}-reader-{uuid.uuid4().hex}"
        self._consumer_seq = 0
        await self._js.add_consumer(
            self._names.evt_stream,
            api.ConsumerConfig(
                name=self._consumer,
                filter_subject=self._names.evt_subjects,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self._next_seq,
                ack_policy=api.AckPolicy.NONE,
                inactive_threshold=_READER_INACTIVE_S,
                mem_storage=True,
                num_replicas=1,
            ),
        )
        self._sub = await self._js.pull_subscribe_bind(self._consumer, stream=self._names.evt_stream)

    async def close(self) -> None:
        if self._sub is not None:
            await _unsubscribe(self._sub)
            self._sub = None
        with suppress(Exception):
            async with asyncio.timeout(_CLEANUP_TIMEOUT_S):
                await self._js.delete_consumer(self._names.evt_stream, self._consumer)

    async def next_batch(self, idle_timeout_s: float | None) -> list[Msg]:
        """The next messages in order; empty only once ``idle_timeout_s`` passed without any."""
        deadline = _deadline(idle_timeout_s)
        while (wait := _fetch_wait(deadline)) is not None:
            assert self._sub is not None
            try:
                msgs = await self._sub.fetch(_EVENT_BATCH, timeout=wait)
            except TimeoutError:
                continue
            except APIError:
                # The consumer went away (server restart, inactivity): start again where we were.
                log.warning("event reader consumer lost; re-creating it at %d", self._next_seq)
                await self.close()
                await self.open()
                continue
            batch = self._in_order(msgs)
            if len(batch) < len(msgs):
                await self.close()
                await self.open()
            if batch:
                return batch
        return []

    def _in_order(self, msgs: list[Msg]) -> list[Msg]:
        batch = []
        for msg in msgs:
            sequence = msg.metadata.sequence
            if sequence.consumer != self._consumer_seq + 1:
                break
            self._consumer_seq = sequence.consumer
            self._next_seq = sequence.stream + 1
            batch.append(msg)
        return batch


# --- helpers ------------------------------------------------------------------------------------


async def _ensure_stream(js: JetStreamContext, config: api.StreamConfig) -> None:
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
            subjects=config.subjects, max_age=config.max_age, duplicate_window=config.duplicate_window
        )
        if wanted != current:
            await js.update_stream(wanted)


async def _pull_one(sub: JetStreamContext.PullSubscription, idle_timeout_s: float | None) -> Msg | None:
    deadline = _deadline(idle_timeout_s)
    while (wait := _fetch_wait(deadline)) is not None:
        try:
            return (await sub.fetch(1, timeout=wait))[0]
        except TimeoutError:
            continue
    return None


def _deadline(idle_timeout_s: float | None) -> float | None:
    return None if idle_timeout_s is None else asyncio.get_running_loop().time() + idle_timeout_s


def _fetch_wait(deadline: float | None) -> float | None:
    """How long the next pull request may wait; None once the idle deadline has passed."""
    if deadline is None:
        return _FETCH_WAIT_S
    left = deadline - asyncio.get_running_loop().time()
    return min(left, _FETCH_WAIT_S) if left >= _MIN_FETCH_WAIT_S else None


async def _unsubscribe(sub: JetStreamContext.PullSubscription) -> None:
    # Unsubscribing before the connection closes is what keeps close() fast after a timed-out fetch.
    with suppress(Exception):
        await sub.unsubscribe()
