"""Pulling from JetStream consumers: one command at a time, or the event log in batches.

Both bound every pull request by an optional idle deadline, so burst-mode iterators end on time.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import deque
from contextlib import suppress

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from bus._names import NatsNames

log = structlog.get_logger(__name__)

# Length of one long-poll pull request when no idle timeout bounds it: short enough that a
# request left behind on the server by a cancelled fetch expires soon.
_FETCH_WAIT_S = 5.0
_MIN_FETCH_WAIT_S = 0.01
# How long a stopping consumer waits for redeliveries already on their way to its open pull request.
_STRAGGLER_GRACE_S = 0.05
_EVENT_BATCH = 256
# A request that should have ended by now (its expiry passed) and did not, is taken as lost.
_REQUEST_GRACE_S = 1.0
_RETRY_PAUSE_S = 0.25
_JS_API = "$JS.API"
# JetStream status codes on a pull request's inbox.
_HEARTBEAT = "100"
_NO_MESSAGES = "404"
_EXPIRED = "408"
# The server deletes a reader's ephemeral consumer after this long without pulls (a crashed reader).
_READER_INACTIVE_S = 60.0
_CLEANUP_TIMEOUT_S = 1.0


class EventReader:
    """An ephemeral pull consumer over the event stream that restarts where it left off.

    Pull requests are made by hand, one open at a time for up to ``_EVENT_BATCH`` messages, on a
    plain subscription whose callback only files each message: nats-py's ``fetch`` spends a task, a
    uuid and a timer on every message it hands over, which was most of the projector's CPU per
    event. The server ends a request when it has delivered the batch or when it expires (a 408);
    a request that ends in silence (the server restarted) or in another status is followed by a
    look at the consumer, which is re-created if it is gone.

    Acks are off (a reader keeps its own position), so a batch lost in a reconnect shows up as a
    gap in the consumer sequence; the consumer is then re-created from the next stream sequence.
    """

    def __init__(self, js: JetStreamContext, nc: NATS, names: NatsNames, after: int | None) -> None:
        self._js = js
        self._nc = nc
        self._names = names
        self._next_seq = (after or 0) + 1
        self._consumer = ""
        self._consumer_seq = 0
        self._sub: Subscription | None = None
        self._arrived: deque[Msg] = deque()
        self._wake = asyncio.Event()
        # Messages the open pull request may still deliver (0: none is open), and the loop time by
        # which its 408 should have come.
        self._request_left = 0
        self._request_until = 0.0
        # Something other than messages or an expiry ended a request: look at the consumer.
        self._check_consumer = False

    async def open(self) -> None:
        self._consumer = f"{self._names.namespace}-reader-{uuid.uuid4().hex}"
        self._consumer_seq = 0
        self._request_left = 0
        self._check_consumer = False
        self._arrived.clear()
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
        # A fresh inbox each time: nothing meant for an earlier consumer reaches this one. Never
        # more than one request's batch is pending, so the subscription's limits are never met.
        self._sub = await self._nc.subscribe(self._nc.new_inbox(), cb=self._on_message)

    async def close(self) -> None:
        if self._sub is not None:
            await unsubscribe(self._sub)
            self._sub = None
        self._arrived.clear()
        with suppress(Exception):
            async with asyncio.timeout(_CLEANUP_TIMEOUT_S):
                await self._js.delete_consumer(self._names.evt_stream, self._consumer)

    async def _on_message(self, msg: Msg) -> None:
        status = msg.headers.get(api.Header.STATUS) if msg.headers else None
        if status is None:
            self._arrived.append(msg)
            self._request_left = max(self._request_left - 1, 0)
        elif status == _HEARTBEAT:
            return
        else:
            # No messages (404) or expired (408): the request is over. Anything else (409 consumer
            # deleted or leadership changed, 503 no responders) also says to look at the consumer.
            self._request_left = 0
            self._check_consumer = status not in (_NO_MESSAGES, _EXPIRED)
        self._wake.set()

    async def next_batch(self, idle_timeout_s: float | None) -> list[Msg]:
        """The next messages in order; empty only once ``idle_timeout_s`` passed without any."""
        loop = asyncio.get_running_loop()
        deadline = _deadline(idle_timeout_s)
        while True:
            if self._arrived:
                taken = len(self._arrived)
                batch = self._in_order([self._arrived.popleft() for _ in range(taken)])
                if len(batch) < taken:
                    await self._reopen()
                if batch:
                    return batch
                continue
            now = loop.time()
            if self._request_left > 0 and now >= self._request_until + _REQUEST_GRACE_S:
                self._check_consumer = True  # the request ended in silence: the server went away
                self._request_left = 0
            if self._check_consumer:
                if not await self._consumer_present():
                    await self._reopen()
                    continue
                self._check_consumer = False
            if self._request_left == 0:
                await self._request(now)
            wait = self._request_until + _REQUEST_GRACE_S - now
            if deadline is not None:
                if deadline - now < _MIN_FETCH_WAIT_S:
                    return []
                wait = min(wait, deadline - now)
            self._wake.clear()
            with suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _request(self, now: float) -> None:
        assert self._sub is not None
        request = {"batch": _EVENT_BATCH, "expires": int(_FETCH_WAIT_S * 1e9)}
        self._request_left = _EVENT_BATCH
        self._request_until = now + _FETCH_WAIT_S
        with suppress(Exception):  # disconnected: the request counts as lost, and is made again
            await self._nc.publish(
                f"{_JS_API}.CONSUMER.MSG.NEXT.{self._names.evt_stream}.{self._consumer}",
                json.dumps(request).encode(),
                reply=self._sub.subject,
            )

    async def _consumer_present(self) -> bool:
        """False once the server says the consumer is gone; True while it cannot tell (a request
        goes out again, and ends in silence again until the server is back)."""
        try:
            async with asyncio.timeout(_CLEANUP_TIMEOUT_S):
                await self._js.consumer_info(self._names.evt_stream, self._consumer)
        except NotFoundError:
            log.warning("event_reader_consumer_lost", resume_at=self._next_seq)
            return False
        except Exception:
            await asyncio.sleep(_RETRY_PAUSE_S)
        return True

    async def _reopen(self) -> None:
        await self.close()
        await self.open()

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


async def unsubscribe(sub: Subscription | JetStreamContext.PullSubscription) -> None:
    # Unsubscribing before the connection closes is what keeps close() fast after a timed-out fetch.
    with suppress(Exception):
        await sub.unsubscribe()
