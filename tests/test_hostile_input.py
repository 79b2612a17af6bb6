"""Hostile input against a real HTTP replica: odd paths, injected headers, huge, slow and idle clients.

Requests go over raw sockets where an HTTP client would normalise them (``..`` segments, control
characters, bodies that never end). The replica runs with the server options ``imagebus ingress``
uses (``ingress.hardening.uvicorn_options``) and short timeouts, so the bounds show in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from litestar import Litestar

from imagebus.process import free_port
from ingress.app import create_app
from ingress.config import IngressConfig
from ingress.hardening import MAX_HEAD_BYTES, StreamSlots, uvicorn_options
from storage.object_store import S3Config
from tests.fixtures.s3 import remove_bucket
from tests.stack import KEY_ADMIN, KEY_ALICE, auth, running_stack, served
from workers.backends.base import Backend

BODY_TIMEOUT_S = 1.0
HEADER_TIMEOUT_S = 1.0
MAX_BODY_BYTES = 64 * 1024
IDLE_STREAMS = 2000
# What the replica answers within, for each bound (the bound itself plus scheduling slack on a busy machine).
SLACK_S = 2.0


@dataclass
class Replica:
    app: Litestar
    port: int
    client: httpx.AsyncClient

    @property
    def stream_slots(self) -> StreamSlots:
        slots: StreamSlots = self.app.state.stream_slots
        return slots


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    head: bytes = field(repr=False)

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key == name.lower()), None)

    def json(self) -> Any:
        return json.loads(self.body)


@contextlib.asynccontextmanager
async def hardened_replica(config: IngressConfig) -> AsyncIterator[Replica]:
    app = create_app(config)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **uvicorn_options(config))
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield Replica(app, port, client)
    finally:
        server.should_exit = True
        await task


@pytest.fixture(scope="module")
async def replica(
    nats_url: str, s3_server: Any, tiny_backend: Backend, tmp_path_factory: Any
) -> AsyncIterator[Replica]:
    s3 = S3Config(
        endpoint=s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        bucket=f"hostile-{time.time_ns()}",
    )
    database_url = f"sqlite:///{tmp_path_factory.mktemp('hostile')}/rm.db"
    async with (
        running_stack(
            nats_url,
            s3,
            database_url,
            tiny_backend,
            workers=0,
            max_body_bytes=MAX_BODY_BYTES,
            body_timeout_s=BODY_TIMEOUT_S,
            header_timeout_s=HEADER_TIMEOUT_S,
            max_streams=IDLE_STREAMS,
        ) as stack,
        hardened_replica(stack.config) as served,
    ):
        yield served
        # Whatever the tests sent, the replica still answers.
        assert (await served.client.get("/health")).status_code == 200
    remove_bucket(s3)


async def raw_exchange(port: int, request: bytes, *, timeout_s: float = 10.0) -> RawResponse:
    """Send ``request`` as bytes and read one response (the request should say Connection: close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), timeout_s)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = [
        (name.strip().lower(), value.strip()) for name, _, value in (line.partition(":") for line in lines if line)
    ]
    length = next((int(value) for name, value in headers if name == "content-length"), None)
    body = await reader.readexactly(length) if length is not None else await reader.read()
    return RawResponse(int(status_line.split(" ")[1]), headers, body, head)


async def assert_closed(reader: asyncio.StreamReader, context: object = None) -> None:
    """The server has closed the connection (a reset counts: it closed with our bytes unread)."""
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), SLACK_S) == b"", ("the connection stays open", context)


def request_head(method: str, target: str, *headers: str, body_length: int | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: imagebus.test", "Connection: close", *headers]
    if body_length is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {body_length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def assert_json_4xx(response: RawResponse, context: object) -> None:
    assert 400 <= response.status < 500, (context, response.status, response.body[:300])
    assert (response.header("content-type") or "").startswith("application/json"), (context, response.head)
    body = response.json()
    assert body.get("status") in ("error", "NOT_FOUND") and isinstance(body.get("message"), str), (context, body)


# --- path parameters --------------------------------------------------------------------------

# Each aims at a file outside what the route may serve: /etc/passwd, or this package's app.py
# (the parent of the web page's folder, which /static serves).
HOSTILE_SEGMENTS = [
    "../../../../etc/passwd",
    "..%2f..%2f..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%252e%252e%252f%252e%252e%252fetc%252fpasswd",
    "..%5c..%5c..%5cetc%5cpasswd",
    "..\\..\\..\\etc\\passwd",
    "%2fetc%2fpasswd",
    "%c0%ae%c0%ae%c0%af%c0%ae%c0%ae%c0%afetc%c0%afpasswd",
    "%ef%bc%8e%ef%bc%8e%ef%bc%8f%ef%bc%8e%ef%bc%8e%ef%bc%8fetc%ef%bc%8fpasswd",  # fullwidth full stops and solidus
    "%e2%80%a4%e2%80%a4%e2%88%95etc%e2%88%95passwd",  # one-dot leaders, division slash
    "..%00/..%00/etc/passwd",
    "0123456789abcdef0123456789abcdef%00.png",
    "%00",
    "%ff%fe%fd",
    "..;/..;/etc/passwd",
    "....//....//etc/passwd",
    "../app.py",
    "%2e%2e%2fapp.py",
    "..%2fapp.py",
    "%2e%2e/%2e%2e/ingress/app.py",
    "a" * 10_000,
]
OUTSIDE_CONTENT = (b"root:x:0:0", b"def create_app")


async def test_path_parameters_refuse_traversal_and_odd_encodings(replica: Replica) -> None:
    document = (await replica.client.get("/docs/openapi.json")).json()
    templates = [
        (method.upper(), path) for path, operations in document["paths"].items() if "{" in path for method in operations
    ]
    # Outside the document: signed links and the web page's static files.
    templates += [("GET", "/files/{filename}"), ("GET", "/files/thumbs/{filename}"), ("GET", "/static/{path}")]
    assert len(templates) >= 15, templates
    tried = 0
    for method, template in templates:
        for segment in HOSTILE_SEGMENTS:
            target = _fill(template, segment)
            body = b'{"prompt": "x"}' if method in ("PUT", "POST") else b""
            head = request_head(method, target, f"X-API-Key: {KEY_ADMIN}", body_length=len(body) if body else None)
            response = await raw_exchange(replica.port, head + body)
            tried += 1
            if response.status == 400 and response.header("content-type") == "text/plain; charset=utf-8":
                # Refused by the HTTP parser itself (not a valid request line): no route saw it.
                assert response.body == b"Invalid HTTP request received.", (target, response.body)
                continue
            assert_json_4xx(response, (method, target[:120]))
            assert not any(marker in response.body for marker in OUTSIDE_CONTENT), (method, target[:120])
    assert tried == len(templates) * len(HOSTILE_SEGMENTS)


def _fill(template: str, segment: str) -> str:
    start, end = template.index("{"), template.index("}")
    return template[:start] + segment + template[end + 1 :]


# --- NUL characters -------------------------------------------------------------------------

# Each reached PostgreSQL, which holds no NUL in text, and came back 500 before the ingress refused them.
NUL_REQUESTS = [
    ("GET", "/api/gallery?search=a%00b", None),
    ("GET", "/api/images?model=%00", None),
    ("GET", "/api/jobs?owner=%00", None),
    ("GET", "/generateImage?prompt=a%00b", None),
    ("POST", "/api/generate", {"prompt": "a\x00b"}),
    ("POST", "/api/generate", {"prompt": "a", "negative_prompt": "\x00"}),
    ("PUT", "/api/jobs/0123456789abcdef0123456789abcdef", {"prompt": "a\x00b"}),
    ("POST", "/generate", {"prompt": "a\x00b"}),
    ("POST", "/api/keys", {"name": "a\x00b"}),
]


async def test_nul_characters_are_refused_on_every_database(
    nats_url: str, storage_config: S3Config, tiny_backend: Backend, database_url: str
) -> None:
    async with (
        running_stack(nats_url, storage_config, database_url, tiny_backend, workers=0) as stack,
        served(stack.config) as client,
    ):
        for method, url, body in NUL_REQUESTS:
            response = await client.request(method, url, json=body, headers=auth(KEY_ADMIN))
            assert response.status_code == 400, (method, url, body, response.status_code, response.text)
            assert response.json()["status"] == "error", response.text
        # A backslash before u0000 is text, not a NUL: taken.
        literal = await client.post("/api/generate", json={"prompt": "a\\u0000b"}, headers=auth(KEY_ADMIN))
        assert literal.status_code == 202, literal.text


# --- header injection ---------------------------------------------------------------------------

INJECTED_HEADERS = ["Idempotency-Key", "X-API-Key", "Authorization", "X-Forwarded-For", "Last-Event-ID"]
# Raw bytes inside a header value. A bare CR or LF, NUL and other controls must not reach the app
# as part of a value, nor come back as a header of the answer.
CONTROL_VALUES = [b"a\rX-Injected: 1", b"a\nX-Injected: 1", b"a\x00X-Injected: 1", b"a\x01b", b"a\x7fb", b"a\x1bb"]


async def test_control_characters_in_headers_are_refused_and_never_reflected(replica: Replica) -> None:
    for name in INJECTED_HEADERS:
        for value in CONTROL_VALUES:
            body = b'{"prompt": "x"}'
            head = (
                b"POST /api/generate HTTP/1.1\r\nHost: imagebus.test\r\nConnection: close\r\n"
                + f"X-API-Key: {KEY_ALICE}\r\n".encode() * (name != "X-API-Key")
                + name.encode()
                + b": "
                + value
                + b"\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n"
            )
            response = await raw_exchange(replica.port, head + body)
            context = (name, value)
            assert 400 <= response.status < 500, (context, response.status, response.body)
            assert response.header("x-injected") is None, (context, response.head)
            assert b"\r\nX-Injected" not in response.head and b"\nx-injected" not in response.head.lower(), context


async def test_a_split_header_line_is_two_request_headers_never_an_answer_header(replica: Replica) -> None:
    # CRLF inside a value ends it: what follows is a second request header, not part of the value.
    # Whatever the ingress does with it, nothing of it comes back as a response header.
    for name in INJECTED_HEADERS:
        head = request_head(
            "POST",
            "/api/generate",
            f"X-API-Key: {KEY_ALICE}" if name != "X-API-Key" else "X-Ignored: 1",
            f"{name}: split\r\nX-Injected: 1",
            body_length=15,
        )
        response = await raw_exchange(replica.port, head + b'{"prompt": "x"}')
        assert response.status < 500, (name, response.status, response.body)
        assert response.header("x-injected") is None, (name, response.head)

    # A percent-encoded CRLF in a path or query value (file names included, which a file answer
    # would name in Content-Disposition) never becomes a header line.
    for target in (
        "/api/jobs/a%0d%0aX-Injected:%201",
        "/api/jobs?status=a%0d%0aX-Injected:%201",
        "/static/a%0d%0aX-Injected:%201.js",
        "/files/a%0d%0aX-Injected:%201.png?sig=a%0d%0aX-Injected:%201",
        "/api/images/a%0d%0aX-Injected:%201.png?format=a%0d%0aX-Injected:%201",
    ):
        encoded = await raw_exchange(replica.port, request_head("GET", target, f"X-API-Key: {KEY_ALICE}"))
        assert_json_4xx(encoded, target)
        assert encoded.header("x-injected") is None and encoded.header("content-disposition") is None, target


async def test_an_oversized_head_is_refused(replica: Replica) -> None:
    padding = "x" * 8000
    many = [f"X-Padding-{index}: {padding}" for index in range(MAX_HEAD_BYTES // len(padding) + 4)]
    response = await raw_exchange(replica.port, request_head("GET", "/health", *many))
    assert response.status == 431, response.head
    assert response.json()["status"] == "error"


# --- oversized bodies ---------------------------------------------------------------------------


async def test_a_declared_oversized_body_is_refused_before_it_is_read(replica: Replica) -> None:
    # Ten gigabytes announced, a few bytes sent: the answer comes at once, and the connection closes.
    reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)
    started = time.monotonic()
    try:
        writer.write(request_head("POST", "/api/generate", f"X-API-Key: {KEY_ALICE}", body_length=10 * 1024**3))
        writer.write(b'{"prompt": "')
        await writer.drain()
        response = await asyncio.wait_for(read_response(reader), 5)
        await assert_closed(reader)
    finally:
        writer.close()
    assert response.status == 413 and response.json()["status"] == "error", response.head
    assert time.monotonic() - started < SLACK_S
    # Also for a route that never reads a body, and without a key (refused before auth).
    for target in ("/health", "/api/models", "/api/jobs"):
        late = await raw_exchange(replica.port, request_head("GET", target, body_length=MAX_BODY_BYTES + 1))
        assert late.status == 413, (target, late.head)


async def test_an_oversized_chunked_body_is_cut_off(replica: Replica) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)
    head = (
        b"POST /api/generate HTTP/1.1\r\nHost: imagebus.test\r\nContent-Type: application/json\r\n"
        + f"X-API-Key: {KEY_ALICE}\r\n".encode()
        + b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
    sent = 0
    writer.write(head)
    answer = asyncio.create_task(read_response(reader))
    try:
        # Keep sending until the answer comes (or the server hangs up): long before 64 MiB.
        with contextlib.suppress(ConnectionError):
            while not answer.done() and sent < 64 * 1024**2:
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 5)
                sent += len(chunk)
        response = await asyncio.wait_for(answer, 5)
        await assert_closed(reader)
    finally:
        writer.close()
    assert response.status == 413 and response.json()["status"] == "error", response.head
    assert sent < 16 * 1024**2, f"sent {sent} bytes before the answer"


async def test_an_oversized_body_with_its_length_declared_is_refused(replica: Replica) -> None:
    body = json.dumps({"prompt": "x" * (MAX_BODY_BYTES * 2)}).encode()
    response = await raw_exchange(
        replica.port, request_head("POST", "/api/generate", f"X-API-Key: {KEY_ALICE}", body_length=len(body)) + body
    )
    assert response.status == 413 and response.json()["status"] == "error"


# --- slow clients -------------------------------------------------------------------------------


async def test_a_slow_body_gets_408_within_the_body_timeout(replica: Replica) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)
    started = time.monotonic()
    writer.write(request_head("POST", "/api/generate", f"X-API-Key: {KEY_ALICE}", body_length=100))

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            for byte in b'{"prompt": "' + b"x" * 80:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.5)

    trickling = asyncio.create_task(trickle())
    try:
        response = await asyncio.wait_for(read_response(reader), BODY_TIMEOUT_S + SLACK_S)
        await assert_closed(reader)
    finally:
        trickling.cancel()
        writer.close()
    assert response.status == 408 and response.json()["status"] == "error", response.head
    assert time.monotonic() - started < BODY_TIMEOUT_S + SLACK_S


async def test_slow_or_silent_heads_are_cut_off_within_the_header_timeout(replica: Replica) -> None:
    # Headers a byte at a time: 408 JSON, then the connection closes.
    reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)
    started = time.monotonic()

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            for byte in b"GET /health HTTP/1.1\r\nHost: imagebus.test\r\nX-Slow: " + b"y" * 100:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.2)

    trickling = asyncio.create_task(trickle())
    try:
        response = await asyncio.wait_for(read_response(reader), HEADER_TIMEOUT_S + SLACK_S)
        await assert_closed(reader)
    finally:
        trickling.cancel()
        writer.close()
    assert response.status == 408 and response.json()["status"] == "error", response.head
    assert time.monotonic() - started < HEADER_TIMEOUT_S + SLACK_S

    # A connection that says nothing is closed.
    reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)
    started = time.monotonic()
    try:
        await asyncio.wait_for(assert_closed(reader), HEADER_TIMEOUT_S + SLACK_S)
    finally:
        writer.close()
    assert time.monotonic() - started < HEADER_TIMEOUT_S + SLACK_S


# --- idle streams -------------------------------------------------------------------------------


async def test_thousands_of_idle_streams_are_bounded_and_freed(replica: Replica) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 3 * IDLE_STREAMS + 500  # both ends of every stream in this process, and room
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    assert replica.stream_slots.open == 0
    rss_before = _rss_bytes()
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for start in range(0, IDLE_STREAMS, 200):
            streams += await asyncio.gather(*(_open_gallery_stream(replica.port) for _ in range(start, start + 200)))
        assert replica.stream_slots.open == IDLE_STREAMS

        # The replica still answers at once, streams or not.
        for path, headers in (("/health", {}), ("/api/jobs", auth()), ("/api/models", {})):
            started = time.monotonic()
            response = await replica.client.get(path, headers=headers)
            assert response.status_code == 200, (path, response.text)
            assert time.monotonic() - started < 1.0, path

        # One more stream: 503 with Retry-After, as JSON.
        refused = await raw_exchange(replica.port, request_head("GET", "/api/sse/gallery", f"X-API-Key: {KEY_ALICE}"))
        assert refused.status == 503, refused.head
        assert refused.header("retry-after") is not None and refused.json()["status"] == "error"

        grown = _rss_bytes() - rss_before
        # Both ends of every stream live in this process; well under 100 kB a stream together.
        assert grown < IDLE_STREAMS * 100 * 1024, f"memory grew {grown / 1e6:.0f} MB for {IDLE_STREAMS} streams"
    finally:
        for _, writer in streams:
            writer.close()
    for _ in range(200):  # up to 10 s for the server to see every close
        if not replica.stream_slots.open:
            break
        await asyncio.sleep(0.05)
    assert replica.stream_slots.open == 0, f"{replica.stream_slots.open} slots still held after every client left"
    _, writer = await _open_gallery_stream(replica.port)  # and a new stream is taken again
    writer.close()


async def _open_gallery_stream(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /api/sse/gallery HTTP/1.1\r\nHost: imagebus.test\r\nX-API-Key: {KEY_ALICE}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"connected" in await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    return reader, writer


def _rss_bytes() -> int:
    with Path("/proc/self/statm").open() as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()
