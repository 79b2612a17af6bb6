"""Pulling from JetStream consumers: one command at a time, or the event log in batches.

Both bound every pull request by an optional idle deadline, so burst-mode iterators end on time.
"""

from __future__ import annotations

import asyncio
import uuid
from contextlib import suppress

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import APIError

from bus._names import NatsNames

log = structlog.get_logger(__name__)

# Length of one long-poll pull request when no idle timeout bounds it: short enough that a
# request left behind on the server by a cancelled fetch expires soon.
_FETCH_WAIT_S = 5.0
_MIN_FETCH_WAIT_S = 0.01
# How long a stopping consumer waits for redeliveries already on their way to its open pull request.
_STRAGGLER_GRACE_S = 0.05
_EVENT_BATCH = 256
# The server deletes a reader's ephemeral consumer after this long without pulls (a crashed reader).
_READER_INACTIVE_S = 60.0
_CLEANUP_TIMEOUT_S = 1.0


class EventReader:
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
            await unsubscribe(self._sub)
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
                msgs = await cancellable_fetch(self._sub, _EVENT_BATCH, wait)
            except TimeoutError:
                continue
            except APIError:
                # The consumer went away (server restart, inactivity): start again where we were.
                log.warning("event_reader_consumer_lost", resume_at=self._next_seq)
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


async def pull_one(sub: JetStreamContext.PullSubscription, idle_timeout_s: float | None) -> Msg | None:
    deadline = _deadline(idle_timeout_s)
    while (wait := _fetch_wait(deadline)) is not None:
        try:
            return (await cancellable_fetch(sub, 1, wait))[0]
        except TimeoutError:
            continue
    return None


async def cancellable_fetch(sub: JetStreamContext.PullSubscription, batch: int, wait_s: float) -> list[Msg]:
    """``sub.fetch`` that gives way to a cancel at once.

    nats-py waits inside a task of its own through ``asyncio.wait_for``, which on Python 3.11 can
    swallow a cancel that lands as a message arrives; the fetch then goes on waiting and a stopping
    projector or worker hung for its whole timeout. Shielded, our side of the wait ends on cancel
    while the fetch is told to stop and left to finish on its own.
    """
    fetch = asyncio.ensure_future(sub.fetch(batch, timeout=wait_s))
    try:
        return await asyncio.shield(fetch)
    except asyncio.CancelledError:
        fetch.cancel()
        # Whatever it ends with is nobody's business now; retrieving it keeps asyncio quiet.
        fetch.add_done_callback(lambda done: done.cancelled() or done.exception())
        raise


def _deadline(idle_timeout_s: float | None) -> float | None:
    return None if idle_timeout_s is None else asyncio.get_running_loop().time() + idle_timeout_s


def _fetch_wait(deadline: float | None) -> float | None:
    """How long the next pull request may wait; None once the idle deadline has passed."""
    if deadline is None:
        return _FETCH_WAIT_S
    left = deadline - asyncio.get_running_loop().time()
    return min(left, _FETCH_WAIT_S) if left >= _MIN_FETCH_WAIT_S else None


async def nak_stragglers(sub: JetStreamContext.PullSubscription, nc: NATS) -> int:
    """Hand back commands that reached a pull request we stopped waiting for.

    A worker that stops while a fetch is outstanding leaves that pull request open on the server
    until it expires; a command handed back meanwhile (by this very worker, draining) is delivered
    into it. Unsubscribing would drop it until ack_wait ran out; naking it makes it available now.
    nats-py exposes the subscription's pending messages only through its private ``_sub``.
    """
    await asyncio.sleep(_STRAGGLER_GRACE_S)
    with suppress(Exception):
        await nc.flush()
    handed_back = 0
    inner = getattr(sub, "_sub", None)
    while inner is not None and sub.pending_msgs > 0:
        try:
            msg = await inner.next_msg(timeout=0.01)
        except Exception:
            break
        if msg.reply and msg.reply.startswith("$JS.ACK."):
            with suppress(Exception):
                await msg.nak()
                handed_back += 1
    return handed_back


async def withdraw_pull(sub: JetStreamContext.PullSubscription, nc: NATS) -> None:
    """Take back an open pull request: hand back what already reached it, then drop our interest
    in its inbox, on which the server drops the request instead of delivering into it."""
    await nak_stragglers(sub, nc)
    await unsubscribe(sub)
    with suppress(Exception):
        await nc.flush()


async def unsubscribe(sub: JetStreamContext.PullSubscription) -> None:
    # Unsubscribing before the connection closes is what keeps close() fast after a timed-out fetch.
    with suppress(Exception):
        await sub.unsubscribe()
