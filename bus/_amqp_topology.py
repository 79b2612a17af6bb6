"""The RabbitMQ topology of one namespace: exchanges, the per-backend command queues, the event stream."""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractQueue

from bus._names import AmqpNames
from bus.base import BusOptions


async def declare_topology(channel: AbstractChannel, names: AmqpNames, options: BusOptions) -> None:
    """Everything but the command queues, which are declared per backend when first used."""
    await channel.declare_exchange(names.commands_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
    await channel.declare_exchange(names.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    await channel.declare_exchange(names.control_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    dead_letter = await channel.declare_exchange(names.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
    dead = await channel.declare_queue(names.dead_queue, durable=True)
    await dead.bind(dead_letter, routing_key="")
    events_log = await declare_events_log(channel, names, options)
    await events_log.bind(names.events_exchange, routing_key=names.evt_binding(None))


async def declare_live_exchange(channel: AbstractChannel, names: AmqpNames) -> None:
    """Live-only events: not durable (gone with a broker restart, and re-declared by whoever uses
    it), never auto-deleted (a publisher must find it while no one watches), bound to watchers only."""
    await channel.declare_exchange(names.live_exchange, aio_pika.ExchangeType.TOPIC, durable=False)


async def declare_command_queue(
    channel: AbstractChannel, names: AmqpNames, options: BusOptions, backend: str
) -> AbstractQueue:
    queue = await channel.declare_queue(
        names.cmd_queue(backend),
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            # The broker dead-letters once a message has been returned more than this many times,
            # so a worker still sees the verdict delivery (number delivery_limit) and fails the job.
            "x-delivery-limit": options.delivery_limit - 1,
            "x-dead-letter-exchange": names.dead_letter_exchange,
        },
    )
    await queue.bind(names.commands_exchange, routing_key=backend)
    return queue


async def declare_events_log(channel: AbstractChannel, names: AmqpNames, options: BusOptions) -> AbstractQueue:
    return await channel.declare_queue(
        names.events_log,
        durable=True,
        arguments={"x-queue-type": "stream", "x-max-age": _max_age(options.event_retention_s)},
    )


def _max_age(seconds: float) -> str:
    """RabbitMQ's x-max-age syntax: a whole number with a unit (``7D``, ``12h``, ``90s``)."""
    whole = max(int(seconds), 1)
    for unit, size in (("D", 86_400), ("h", 3_600), ("m", 60)):
        if whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"
