"""Receive imagebus completion events straight from the bus, as a program outside imagebus would.

Needs only the broker's client library (``pip install nats-py`` or ``pip install aio-pika``);
nothing from imagebus is imported. Every event is JSON with ``type``, ``schema_version``,
``message_id``, ``job_id`` and ``occurred_at``; ``JobSucceeded`` adds ``image_ids``, ``JobFailed``
``error``, ``JobCanceled`` ``reason`` (the models are in imagebus's ``schemas/messages.py``).

Where the events are, for a namespace ``ns`` (``IMAGEBUS_BUS_NAMESPACE``, default ``imagebus``):

- NATS JetStream: subject ``<ns>.evt.<EventType>.<job_id>`` in the stream ``<NS>_EVT`` (the
  namespace upper-cased, other characters as ``_``). A durable consumer per event type resumes
  where it left off after a restart.
- RabbitMQ: topic exchange ``<ns>.events``, routing key ``evt.<EventType>.<job_id>``. A durable
  queue of your own, bound to the keys you want, keeps what arrives while you are away.

A job has exactly one terminal event in imagebus's read model; the bus may repeat one after a
crash (on NATS its repeats share the job's one message id within 2 minutes), so de-duplicate on
``message_id`` or treat them idempotently.

    python examples/event_subscriber.py --bus nats://127.0.0.1:4222
    python examples/event_subscriber.py --bus amqp://guest:guest@127.0.0.1/ --name billing
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Callable

TERMINAL_TYPES = ("JobSucceeded", "JobFailed", "JobCanceled")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bus", required=True, help="nats://... or amqp://...")
    parser.add_argument("--namespace", default="imagebus", help="IMAGEBUS_BUS_NAMESPACE of the installation")
    parser.add_argument("--name", default="example-subscriber", help="durable consumer / queue name")
    parser.add_argument("--count", type=int, default=0, help="exit after this many events (0: run forever)")
    return parser


def _handle(body: bytes, seen: set[str]) -> bool:
    """Print one terminal event as a JSON line; False for a repeat already printed."""
    event = json.loads(body)
    if event["message_id"] in seen:
        return False
    seen.add(event["message_id"])
    print(json.dumps(event), flush=True)
    return True


async def _nats(args: argparse.Namespace, done: Callable[[], bool], seen: set[str]) -> None:
    import nats
    from nats.aio.msg import Msg

    stream = re.sub(r"[^A-Z0-9_]", "_", f"{args.namespace}_EVT".upper())
    nc = await nats.connect(args.bus)
    js = nc.jetstream()
    finished = asyncio.Event()

    async def on_message(msg: Msg) -> None:
        _handle(msg.data, seen)
        await msg.ack()
        if done():
            finished.set()

    subscriptions = []
    for event_type in TERMINAL_TYPES:
        subscriptions.append(
            await js.subscribe(
                f"{args.namespace}.evt.{event_type}.*",
                stream=stream,
                durable=f"{args.name}-{event_type}",
                cb=on_message,
                manual_ack=True,
            )
        )
    print("subscribed", file=sys.stderr, flush=True)
    try:
        await finished.wait()
    finally:
        for subscription in subscriptions:
            await subscription.unsubscribe()
        await nc.close()


async def _amqp(args: argparse.Namespace, done: Callable[[], bool], seen: set[str]) -> None:
    import aio_pika

    connection = await aio_pika.connect_robust(args.bus)
    finished = asyncio.Event()
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=50)
        exchange = await channel.declare_exchange(f"{args.namespace}.events", aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(args.name, durable=True)
        for event_type in TERMINAL_TYPES:
            await queue.bind(exchange, routing_key=f"evt.{event_type}.*")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():  # acked once handled; requeued if this raises
                _handle(message.body, seen)
            if done():
                finished.set()

        await queue.consume(on_message)
        print("subscribed", file=sys.stderr, flush=True)
        await finished.wait()


def main() -> None:
    args = _parser().parse_args()
    seen: set[str] = set()

    def done() -> bool:
        return args.count > 0 and len(seen) >= args.count

    run = _nats if args.bus.startswith("nats") else _amqp
    asyncio.run(run(args, done, seen))


if __name__ == "__main__":
    main()
