"""The Bus contract: every test runs against the in-memory bus, NATS JetStream and RabbitMQ.

Where a broker differs by design (RabbitMQ has no publish de-duplication and no ack-wait timer)
the test asserts the documented behaviour of that broker instead of skipping it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import TypeVar

import pytest

from bus import Bus, BusOptions, CommandDelivery, LoggedEvent, connect_bus
from bus.tracing import attached, trace_context, trace_id_of
from schemas import (
    CancelJob,
    GenerateImage,
    GenerationParams,
    JobHeartbeat,
    JobProgress,
    JobQueued,
    JobStarted,
    new_id,
)
from tests.fixtures.brokers import ConnectBus

T = TypeVar("T")

BACKEND = "stub"
# No test may take longer than this; a broken adapter fails instead of hanging the suite.
TEST_TIMEOUT_S = 15.0
# How long "nothing else arrives" is watched for.
QUIET_S = 0.2

# Documented differences (see bus/amqp.py): RabbitMQ neither de-duplicates publishes nor
# redelivers on an ack-wait timer.
DEDUPLICATES = {"memory": True, "nats": True, "amqp": False}
REDELIVERS_ON_ACK_WAIT = {"memory": True, "nats": True, "amqp": False}


def command(backend: str = BACKEND, job_id: str | None = None) -> GenerateImage:
    return GenerateImage(
        job_id=job_id or new_id(),
        owner="key-1",
        backend=backend,
        params=GenerationParams(
            prompt="a lighthouse", model="stub", width=64, height=64, num_inference_steps=4, guidance_scale=7.0
        ),
    )


def progress(job_id: str, step: int) -> JobProgress:
    """A live-only event: watchers see it, the log never holds it."""
    return JobProgress(job_id=job_id, step=step, total_steps=100)


def heartbeat(job_id: str, number: int) -> JobHeartbeat:
    """A durable event, numbered so a test can tell them apart."""
    return JobHeartbeat(job_id=job_id, worker_id="w1", attempt=number)


async def take(iterator: AsyncIterator[T], count: int) -> list[T]:
    return [await anext(iterator) for _ in range(count)]


async def nothing_more(iterator: AsyncIterator[object], within_s: float = QUIET_S) -> bool:
    try:
        async with asyncio.timeout(within_s):
            await anext(iterator)
    except TimeoutError:
        return True
    return False


async def backlog_becomes(bus: Bus, expected: int, within_s: float = 3.0) -> int:
    """The backlog, polled until it is ``expected`` (or the time is up): settling is asynchronous
    inside the brokers (RabbitMQ requeues a closed channel's unacked messages a moment after the
    close), and the backlog is a scaling metric, not a transactional count."""
    deadline = time.monotonic() + within_s
    backlog = await bus.command_backlog(BACKEND)
    while backlog != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        backlog = await bus.command_backlog(BACKEND)
    return backlog


async def consume_all(bus: Bus, idle_timeout_s: float = QUIET_S) -> list[CommandDelivery]:
    """Burst-consume and ack everything there is."""
    taken: list[CommandDelivery] = []
    async with bus.consume_commands(BACKEND, idle_timeout_s=idle_timeout_s) as deliveries:
        async for delivery in deliveries:
            await delivery.ack()
            taken.append(delivery)
    return taken


async def read_all(
    bus: Bus, after: int | None = None, idle_timeout_s: float = QUIET_S, *, at_least: int = 0
) -> list[LoggedEvent]:
    """The log after ``after``, until it stays quiet for ``idle_timeout_s`` once ``at_least``
    events are in (a reader attaching to a busy broker may take longer than that to start)."""
    logged: list[LoggedEvent] = []
    async with bus.read_events(after=after, idle_timeout_s=None) as events:
        iterator = aiter(events)
        while True:
            wait_s = idle_timeout_s if len(logged) >= at_least else TEST_TIMEOUT_S
            try:
                logged.append(await asyncio.wait_for(anext(iterator), wait_s))
            except (TimeoutError, StopAsyncIteration):
                return logged


# --- commands -------------------------------------------------------------------------------------


async def test_commands_and_events_carry_the_publishers_trace_context(bus: Bus) -> None:
    trace_id = uuid.uuid4().hex
    parent = trace_context({"traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"})
    async with asyncio.timeout(TEST_TIMEOUT_S):
        sent = command()
        with attached(parent):
            await bus.publish_command(sent)
            await bus.publish_event(heartbeat(sent.job_id, 1))
        await bus.publish_event(heartbeat(sent.job_id, 2))  # outside any trace

        taken = await consume_all(bus)
        logged = [entry for entry in await read_all(bus, at_least=2) if entry.event.job_id == sent.job_id]

        assert [trace_id_of(trace_context(d.trace_headers)) for d in taken] == [trace_id]
        assert [trace_id_of(trace_context(entry.trace_headers)) for entry in logged] == [trace_id, None]


async def test_command_is_delivered_once_and_acked(bus: Bus) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        sent = command()
        await bus.publish_command(sent)

        taken = await consume_all(bus)

        assert [(d.command, d.attempt) for d in taken] == [(sent, 1)]
        assert await consume_all(bus) == []
        assert await backlog_becomes(bus, 0) == 0


async def test_commands_go_only_to_their_backend(bus: Bus) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        await bus.publish_command(command(backend="other"))

        assert await consume_all(bus) == []
        assert await bus.command_backlog("other") == 1


async def test_two_consumers_share_the_work(bus: Bus, connect_more: ConnectBus) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        other = await connect_more()
        sent = [command() for _ in range(12)]
        for each in sent:
            await bus.publish_command(each)

        async def worker(on: Bus) -> list[str]:
            done = []
            async with on.consume_commands(BACKEND, idle_timeout_s=0.5) as deliveries:
                async for delivery in deliveries:
                    await asyncio.sleep(0.05)  # some work, so the other worker gets a turn
                    await delivery.ack()
                    done.append(delivery.command.message_id)
            return done

        first, second = await asyncio.gather(worker(bus), worker(other))

        assert sorted(first + second) == sorted(c.message_id for c in sent)
        assert not set(first) & set(second)
        assert first and second


async def test_nak_redelivers_with_the_next_attempt(bus: Bus) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        sent = command()
        await bus.publish_command(sent)

        async with bus.consume_commands(BACKEND, idle_timeout_s=3.0) as deliveries:
            first = await anext(deliveries)
            await first.nak()
            second = await anext(deliveries)
            await second.ack()

        assert (first.command, first.attempt) == (sent, 1)
        assert (second.command, second.attempt) == (sent, 2)


async def test_nak_with_delay_holds_the_redelivery_back(bus: Bus) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        await bus.publish_command(command())

        async with bus.consume_commands(BACKEND, idle_timeout_s=3.0) as deliveries:
            await (await anext(deliveries)).nak(delay_s=0.6)
            naked_at = time.monotonic()
            again = await anext(deliveries)
            waited = time.monotonic() - naked_at
            await again.ack()

        assert again.attempt == 2
        assert waited >= 0.5


async def test_leaving_the_consumer_unsettled_hands_the_command_back(bus: Bus, connect_more: ConnectBus) -> None:
    # A worker whose consumer ends mid-job (it crashed or was stopped): another worker gets the job.
    async with asyncio.timeout(TEST_TIMEOUT_S):
        sent = command()
        await bus.publish_command(sent)
        async with bus.consume_commands(BACKEND, idle_timeout_s=3.0) as deliveries:
            abandoned = await anext(deliveries)

        other = await connect_more()
        async with other.consume_commands(BACKEND, idle_timeout_s=3.0) as deliveries:
            taken = await anext(deliveries)
            await taken.ack()

        assert abandoned.attempt == 1
        assert (taken.command, taken.attempt) == (sent, 2)
        assert await consume_all(other) == []


async def test_unsettled_delivery_after_ack_wait(bus_kind: str, connect_more: ConnectBus) -> None:
    # A worker that hangs without heartbeats: JetStream (and the memory bus) redeliver after the
    # ack wait; RabbitMQ keeps it with the live consumer (it redelivers when the channel dies).
    async with asyncio.timeout(TEST_TIMEOUT_S):
        hung, other = await connect_more(ack_wait_s=1.0), await connect_more(ack_wait_s=1.0)
        await hung.publish_command(command())

        async with hung.consume_commands(BACKEND, idle_timeout_s=3.0) as held:
            stuck = await anext(held)
            async with other.consume_commands(BACKEND, idle_timeout_s=2.5) as deliveries:
                redelivered = await anext(deliveries, None)
                if redelivered is not None:
                    await redelivered.ack()

        assert stuck.attempt == 1
        if REDELIVERS_ON_ACK_WAIT[bus_kind]:
            assert redelivered is not None
            assert (redelivered.command, redelivered.attempt) == (stuck.command, 2)
        else:
            assert redelivered is None


async def test_in_progress_keeps_a_slow_job_from_redelivery(connect_more: ConnectBus) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        slow, other = await connect_more(ack_wait_s=1.0), await connect_more(ack_wait_s=1.0)
        await slow.publish_command(command())

        async def heartbeat_for(delivery: CommandDelivery, seconds: float) -> None:
            for _ in range(int(seconds / 0.25)):
                await delivery.in_progress()
                await asyncio.sleep(0.25)

        async with slow.consume_commands(BACKEND, idle_timeout_s=3.0) as deliveries:
            delivery = await anext(deliveries)
            async with other.consume_commands(BACKEND, idle_timeout_s=2.0) as competing:
                stolen, _ = await asyncio.gather(anext(competing, None), heartbeat_for(delivery, 2.0))
            await delivery.ack()

        assert stolen is None
        assert await backlog_becomes(slow, 0) == 0


async def test_deliveries_are_bounded_by_max_deliveries(bus: Bus, bus_options: BusOptions) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        await bus.publish_command(command())

        attempts = []
        async with bus.consume_commands(BACKEND, idle_timeout_s=QUIET_S) as deliveries:
            async for delivery in deliveries:
                attempts.append(delivery.attempt)
                await delivery.nak()

        # max_deliveries runs plus the verdict delivery, on which a worker dead-letters the command.
        assert attempts == list(range(1, bus_options.max_deliveries + 2))
        assert await backlog_becomes(bus, 0) == 0


async def test_term_drops_the_command(bus: Bus) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        await bus.publish_command(command())

        async with bus.consume_commands(BACKEND, idle_timeout_s=3.0) as deliveries:
            await (await anext(deliveries)).term()

        assert await consume_all(bus) == []
        assert await backlog_becomes(bus, 0) == 0


async def test_a_delivery_is_settled_once(bus: Bus) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        await bus.publish_command(command())

        async with bus.consume_commands(BACKEND, idle_timeout_s=3.0) as deliveries:
            delivery = await anext(deliveries)
            await delivery.ack()
            with pytest.raises(RuntimeError):
                await delivery.nak()
            with pytest.raises(RuntimeError):
                await delivery.in_progress()


async def test_republished_command_is_deduplicated(bus: Bus, bus_kind: str) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        sent = command()
        await bus.publish_command(sent)
        await bus.publish_command(sent)  # a retried publish, same message id

        taken = await consume_all(bus)

        # RabbitMQ has no publish de-duplication: consumers must be (and are) idempotent.
        assert len(taken) == (1 if DEDUPLICATES[bus_kind] else 2)
        assert {d.command.message_id for d in taken} == {sent.message_id}


async def test_command_backlog_counts_waiting_commands(bus: Bus) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        assert await bus.command_backlog(BACKEND) == 0
        for _ in range(3):
            await bus.publish_command(command())
        assert await bus.command_backlog(BACKEND) == 3  # kept though no worker has started yet

        async with bus.consume_commands(BACKEND, idle_timeout_s=3.0) as deliveries:
            await (await anext(deliveries)).ack()

        assert await backlog_becomes(bus, 2) == 2


async def test_idle_consumer_ends(bus: Bus) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        started = time.monotonic()
        assert await consume_all(bus) == []
        assert time.monotonic() - started < 2.0


# --- the event log --------------------------------------------------------------------------------


async def test_event_log_keeps_order_with_increasing_positions(bus: Bus) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        jobs = [new_id() for _ in range(3)]
        sent = [heartbeat(jobs[i % 3], i) for i in range(150)]
        for event in sent:
            await bus.publish_event(event)

        logged = await read_all(bus, at_least=len(sent))

        assert [entry.event for entry in logged] == sent
        positions = [entry.position for entry in logged]
        assert positions == sorted(set(positions))
        assert positions[0] == 1  # a fresh log starts at 1 on every bus, so 0 can mean "nothing read"


async def test_reading_resumes_right_after_a_position(bus: Bus) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        job_id = new_id()
        for number in range(10):
            await bus.publish_event(heartbeat(job_id, number))
        logged = await read_all(bus, at_least=10)

        resumed = await read_all(bus, after=logged[3].position, at_least=6)

        assert resumed == logged[4:]
        assert await read_all(bus, after=logged[-1].position) == []


async def test_reading_an_empty_log_ends_after_the_idle_timeout(bus: Bus) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        started = time.monotonic()
        assert await read_all(bus) == []
        assert time.monotonic() - started < 2.0


async def test_reader_follows_events_published_while_it_waits(bus: Bus) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        job_id = new_id()
        await bus.publish_event(heartbeat(job_id, 0))
        async with bus.read_events() as events:
            first = await anext(events)

            async def publish_later() -> None:
                await asyncio.sleep(0.2)
                for number in (1, 2):
                    await bus.publish_event(heartbeat(job_id, number))

            publishing = asyncio.create_task(publish_later())
            later = await take(events, 2)
            await publishing

        assert [e.event.attempt for e in [first, *later] if isinstance(e.event, JobHeartbeat)] == [0, 1, 2]
        assert first.position < later[0].position < later[1].position


async def test_republished_event_is_logged_once(bus: Bus, bus_kind: str) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        event = JobStarted(job_id=new_id(), worker_id="w1", attempt=1)
        await bus.publish_event(event)
        await bus.publish_event(event)

        logged = await read_all(bus, at_least=1)

        assert len(logged) == (1 if DEDUPLICATES[bus_kind] else 2)
        assert {entry.event for entry in logged} == {event}


# --- live events and control ----------------------------------------------------------------------


async def test_watching_one_job_sees_only_its_live_events(bus: Bus) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        mine, theirs = new_id(), new_id()
        await bus.publish_event(heartbeat(mine, 0))  # before watching: not seen

        async with bus.watch_events(mine) as watched, bus.watch_events() as everything:
            sent = [heartbeat(mine, 1), heartbeat(theirs, 1), heartbeat(mine, 2)]
            for event in sent:
                await bus.publish_event(event)

            assert await take(watched, 2) == [sent[0], sent[2]]
            assert await nothing_more(watched)
            assert await take(everything, 3) == sent


async def test_live_only_events_reach_watchers_and_never_the_log(bus: Bus) -> None:
    # Per-step progress is live data: delivered to whoever watches now, never stored or replayed.
    async with asyncio.timeout(TEST_TIMEOUT_S):
        mine, theirs = new_id(), new_id()
        await bus.publish_event(progress(mine, 0))  # before watching: no one sees it, nothing keeps it

        async with bus.watch_events(mine) as watched, bus.watch_events() as everything:
            steps = [progress(mine, 1), progress(theirs, 1), progress(mine, 2)]
            for event in steps:
                await bus.publish_event(event)
            assert await take(watched, 2) == [steps[0], steps[2]]
            assert await take(everything, 3) == steps

            # Beside durable events, on their own channel: both reach the watcher, in some order.
            started = JobStarted(job_id=mine, worker_id="w1", attempt=1)
            step = progress(mine, 3)
            await bus.publish_event(started)
            await bus.publish_event(step)
            both = await take(watched, 2)
            assert sorted(both, key=lambda e: e.type) == [step, started]
            assert await nothing_more(watched)

        logged = [entry.event for entry in await read_all(bus, at_least=1)]
        assert logged == [started]


async def test_every_event_type_reaches_watchers(bus: Bus) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        job_id = new_id()
        queued = JobQueued(job_id=job_id, owner="key-1", backend=BACKEND, params=command().params)
        async with bus.watch_events(job_id) as watched:
            await bus.publish_event(queued)
            assert await take(watched, 1) == [queued]


async def test_control_reaches_every_watcher_of_the_backend(bus: Bus, connect_more: ConnectBus) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        other = await connect_more()
        cancel = CancelJob(job_id=new_id(), backend=BACKEND)

        async with (
            bus.watch_control(BACKEND) as first,
            other.watch_control(BACKEND) as second,
            bus.watch_control("other") as unrelated,
        ):
            await bus.publish_control(cancel)

            assert await take(first, 1) == [cancel]
            assert await take(second, 1) == [cancel]
            assert await nothing_more(unrelated)


async def test_control_with_no_watchers_is_dropped_quietly(bus: Bus) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        await bus.publish_control(CancelJob(job_id=new_id(), backend=BACKEND))


# --- connections ----------------------------------------------------------------------------------


async def test_names_that_could_escape_the_namespace_are_refused(bus_url: str, bus: Bus) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S):
        with pytest.raises(ValueError):
            await connect_bus(bus_url, BusOptions(namespace="imagebus.>"))
        with pytest.raises(ValueError):
            await bus.publish_command(command(backend="a.b"))


async def test_close_is_quick_after_idle_consumers(bus_url: str, bus_options: BusOptions) -> None:
    # nats-py's drain stalls ~30 s after a timed-out pull fetch; close must not.
    async with asyncio.timeout(TEST_TIMEOUT_S):
        bus = await connect_bus(bus_url, bus_options)
        assert await read_all(bus, idle_timeout_s=0.2) == []
        assert await consume_all(bus, idle_timeout_s=0.2) == []
        started = time.monotonic()
        await bus.close()
        assert time.monotonic() - started < 1.0


async def test_contexts_exit_cleanly_after_the_bus_is_closed(bus_url: str, bus_options: BusOptions) -> None:
    # Shutdown order is not always tidy: a bus closed under open subscriptions must not make their
    # exits raise or hang.
    async with asyncio.timeout(TEST_TIMEOUT_S):
        bus = await connect_bus(bus_url, bus_options)
        await bus.publish_command(command())
        async with (
            bus.consume_commands(BACKEND, idle_timeout_s=3.0) as deliveries,
            bus.read_events(idle_timeout_s=3.0),
            bus.watch_events(),
            bus.watch_control(BACKEND),
        ):
            await anext(deliveries)
            await bus.close()
