"""What a hostile client meets first: bounds on what it can make a replica hold, and a door
closed to input the layers below would fail on rather than refuse.

uvicorn waits as long as a client takes to send a request line, headers or body, and httptools
puts no cap on a head's size; an event stream holds an in-memory inbox and a response task for
as long as its client stays; PostgreSQL errors on a NUL and the static files router on a NUL or an
over-long name. Each is answered here with the usual JSON error, or by closing the connection
where no request exists yet to answer.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, ReceiveMessage, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ingress.config import IngressConfig
from ingress.errors import ApiError

# Request line plus headers. h11 allows 16 KiB by default; this leaves room for long ids in
# paths (a 10 kB one is answered 404, not refused at the door).
MAX_HEAD_BYTES = 64 * 1024
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
# A NUL in a JSON string: \u0000 after an even number of backslashes (an odd one escapes the first).
_JSON_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
# The longest file name most file systems take.
NAME_MAX = 255
# A route handler marked with this ``opt`` key holds one of the process's stream slots while it answers.
HOLDS_STREAM = "holds_stream"
# What a refused stream is told to wait: streams end when clients leave, which is not predictable.
STREAM_RETRY_AFTER_S = 5


class BodyLimits(ASGIMiddleware):
    """413 for a body over ``max_bytes`` (declared or counted), 408 for one slower than ``timeout_s``.

    uvicorn has no body timeout: a client trickling a byte a second holds a request (and a
    connection) for as long as it likes. The deadline counts from when the request reached the app.
    """

    scopes = (ScopeType.HTTP,)

    def __init__(self, max_bytes: int, timeout_s: float) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            raise ApiError(413, f"request body of {declared} bytes is over the limit of {self.max_bytes}", _close())
        body = _BoundedBody(receive, self.max_bytes, asyncio.get_running_loop().time() + self.timeout_s)
        await next_app(scope, body.receive, send)


class _BoundedBody:
    def __init__(self, receive: Receive, max_bytes: int, deadline: float) -> None:
        self._receive = receive
        self._max_bytes = max_bytes
        self._deadline = deadline
        self._read = 0
        self._complete = False

    async def receive(self) -> ReceiveMessage:
        # Once the body is in, receive only waits for a disconnect (streaming answers listen for
        # one the whole time): no deadline applies to that.
        if self._complete:
            return await self._receive()
        try:
            async with asyncio.timeout_at(self._deadline):
                message = await self._receive()
        except TimeoutError:
            raise ApiError(408, "the request body did not arrive in time", _close()) from None
        if message["type"] != "http.request":
            self._complete = True
            return message
        self._read += len(message.get("body", b""))
        if self._read > self._max_bytes:
            raise ApiError(413, f"request body is over the limit of {self._max_bytes} bytes", _close())
        self._complete = not message.get("more_body", False)
        return message


def _close() -> dict[str, str]:
    # An answer that leaves a body unread closes the connection, or uvicorn would go on reading
    # (and discarding) whatever the client still sends.
    return {"Connection": "close"}


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            # httptools has refused anything but digits already.
            return int(value) if value.isdigit() else None
    return None


class PlainInput(ASGIMiddleware):
    """400 for input no route takes and some layer below fails on instead of refusing: a control
    character in the path (decoded from %00 and the like), and a NUL anywhere a client can put
    one (query values and JSON strings; HTTP already refuses one in a header).

    PostgreSQL text holds no NUL: a prompt or a search term with one reached the database and
    came back as a 500. No id, prompt or filter of ours has a use for one.
    """

    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        if _CONTROL_CHARACTERS.search(scope["path"]):
            raise ApiError(400, "the request path contains control characters")
        if b"%00" in scope["query_string"]:
            raise ApiError(400, "the query string contains a NUL character (%00)")
        await next_app(scope, _NulCheckedBody(receive).receive, send)


class _NulCheckedBody:
    """The body as it arrives, refused once complete if it holds a JSON ``\\u0000``."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._chunks: list[bytes] | None = []

    async def receive(self) -> ReceiveMessage:
        message = await self._receive()
        if self._chunks is None or message["type"] != "http.request":
            return message
        self._chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            body, self._chunks = b"".join(self._chunks), None
            if _JSON_NUL.search(body):
                raise ApiError(400, "the request body contains a NUL character (\\u0000)")
        return message


class ShortNames(ASGIMiddleware):
    """404 for a path with a segment longer than a file name may be (NAME_MAX).

    For the static files router, which raises on one (name too long) instead of answering.
    """

    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        if any(len(segment) > NAME_MAX for segment in scope["path"].split("/")):
            raise ApiError(404, f"no file has a name over {NAME_MAX} characters")
        await next_app(scope, receive, send)


class StreamSlots:
    """The event streams open in this process, at most ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0


class StreamCap(ASGIMiddleware):
    """503 with Retry-After for a stream route once ``slots`` are all held; a slot frees when its answer ends."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, slots: StreamSlots) -> None:
        self.slots = slots
        self.should_bypass_for_scope = _holds_no_stream

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        slots = self.slots
        if slots.open >= slots.limit:
            raise ApiError(
                503,
                f"this replica is serving its limit of {slots.limit} streams; try again later",
                {"Retry-After": str(STREAM_RETRY_AFTER_S)},
            )
        slots.open += 1
        try:
            await next_app(scope, receive, send)
        finally:
            slots.open -= 1


def _holds_no_stream(scope: Scope) -> bool:
    return not scope["route_handler"].opt.get(HOLDS_STREAM, False)


class _GuardedHead(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with a deadline and a size cap on each request's head.

    Without them a connection that sends nothing, or a header a byte a second, is held forever
    (uvicorn's keep-alive timeout starts only after a first answer), and a head of any size is
    buffered. A head must be complete within ``head_timeout_s`` of its first byte; a connection that
    sends none is closed that long after it opened (after an answer, uvicorn's keep-alive timeout
    closes it sooner).
    """

    head_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        # The last bytes seen of the head, in case its blank line is split between two reads.
        self._head_tail = b""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        # Counted here, before the parser buffers anything; the head ends at its blank line (the
        # timer stops there, in on_headers_complete) and what follows it is body.
        if self._head_timer is not None and data:
            if not self._head_bytes:
                self._start_head_timer()  # the head starts now
            seen = self._head_tail + data
            end = seen.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else end + 4 - len(self._head_tail)
            self._head_tail = seen[-3:]
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, "request head too large")
                return
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._stop_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._head_bytes = 0
        self._head_tail = b""
        self._start_head_timer()

    def _start_head_timer(self) -> None:
        self._stop_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_too_slow)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._head_bytes:
            self._refuse(408, "the request head did not arrive in time")
        elif not self.transport.is_closing():
            self.transport.close()  # an idle connection: no request to answer

    def _refuse(self, status: int, message: str) -> None:
        self._stop_head_timer()
        if self.transport.is_closing():
            return
        body = json.dumps({"status": "error", "message": message}).encode()
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, reason, len(body), body)
        )
        self.transport.close()


def uvicorn_options(config: IngressConfig) -> dict[str, Any]:
    """Server settings for ``uvicorn.Config`` that bound what a client can hold before the app sees it."""
    guarded = type("GuardedHead", (_GuardedHead,), {"head_timeout_s": config.header_timeout_s})
    return {
        "http": guarded,
        # Beyond this many connections (or requests in flight) uvicorn answers 503 at once.
        "limit_concurrency": config.max_connections,
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
    }
