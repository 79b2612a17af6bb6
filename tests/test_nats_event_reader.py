"""The NATS event reader's own pull requests (bus._nats_pull.EventReader): more events than one
request's batch, and a consumer that disappears under a reader, as after a server restart."""

from __future__ import annotations

import asyncio
import uuid

from bus import BusOptions, connect_bus
from bus._names import NatsNames
from bus.nats import NatsBus
from schemas import JobHeartbeat

TIMEOUT_S = 30.0


def heartbeat(number: int) -> JobHeartbeat:
    return JobHeartbeat(job_id="job1", worker_id="w", attempt=number)


async def connected(nats_url: str) -> NatsBus:
    bus = await connect_bus(nats_url, BusOptions(namespace=f"t{uuid.uuid4().hex[:12]}"))
    assert isinstance(bus, NatsBus)
    return bus


async def test_more_events_than_one_request_holds_arrive_in_order(nats_url: str) -> None:
    bus = await connected(nats_url)
    try:
        async with asyncio.timeout(TIMEOUT_S):
            await asyncio.gather(*(bus.publish_event(heartbeat(number)) for number in range(700)))
            async with bus.read_events(idle_timeout_s=0.5) as events:
                logged = [event async for event in events]
        assert sorted(e.event.attempt for e in logged if isinstance(e.event, JobHeartbeat)) == list(range(700))
        assert [e.position for e in logged] == list(range(1, 701))
    finally:
        await bus.close()


async def test_a_reader_whose_consumer_vanishes_goes_on_where_it_was(nats_url: str) -> None:
    bus = await connected(nats_url)
    names = NatsNames(bus.options.namespace)
    try:
        async with asyncio.timeout(TIMEOUT_S):
            await bus.publish_event(heartbeat(0))
            async with bus.read_events() as events:
                first = await anext(events)
                # What a restarted server does to a reader's in-memory consumer.
                for consumer in await bus._js.consumers_info(names.evt_stream):
                    await bus._js.delete_consumer(names.evt_stream, consumer.name)
                for number in (1, 2):
                    await bus.publish_event(heartbeat(number))
                later = [await anext(events), await anext(events)]
        assert [e.position for e in (first, *later)] == [1, 2, 3]
    finally:
        await bus.close()
