"""The object requests made once per image, on the event loop over kept-alive connections: the
worker's PUT of each image (its length known), and the ingress's streamed GET when it serves one.

Through the minio SDK each was a hop to a thread per call (and per chunk read), urllib3, and for a
PUT a SHA-256 of the payload: about 0.8 CPU-ms an upload, a fifth of the remote worker's whole cost
per job, and under load the ingress's threads fought its event loop for the GIL. Here the request
is signed by a presigned URL (the minio SDK signs it; a PUT's payload goes unsigned, as S3 allows)
and goes out on an asyncio connection: about 0.25 CPU-ms an upload, and a little less latency.
Only what S3 answers is parsed: a status line, headers, and a body sized by Content-Length or
chunked. Anything unusual closes the connection rather than guessing.

Both requests are idempotent, so a connection the server closed while idle (the request goes out,
the read finds nothing) is replaced at once, and a 5xx is retried after a pause, a few times; a GET
only until its first bytes are handed on.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlsplit

_CHUNK = 256 * 1024
_MAX_HEAD = 64 * 1024
_MAX_ERROR_BODY = 64 * 1024
_CONNECT_TIMEOUT_S = 5.0
# A whole PUT (the body going up included), or a GET's wait for its head or any next chunk; the
# SDK's read timeout was the same.
_EXCHANGE_TIMEOUT_S = 60.0
_ATTEMPTS = 4
_BACKOFF_S = 0.2
_MAX_IDLE = 16
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,128})</Code>")
_ERROR_MESSAGE = re.compile(rb"<Message>([^<]{1,512})</Message>")


class S3Refused(Exception):
    """The server refused the request (``status`` 4xx/5xx) with S3's error ``code`` when it gave one."""

    def __init__(self, method: str, status: int, code: str, message: str) -> None:
        super().__init__(f"S3 {method} answered {status} {code}: {message}".rstrip(": "))
        self.status = status
        self.code = code


class S3Unreachable(ConnectionError):
    """Every attempt's connection failed before a whole answer arrived."""


_CONNECTION_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)


@dataclass
class _Connection:
    loop: asyncio.AbstractEventLoop
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        if not self.loop.is_closed():
            self.writer.close()


@dataclass(frozen=True)
class _Head:
    status: int
    headers: dict[str, str]
    keep_alive: bool


class AsyncS3:
    """PUTs and GETs on one S3 endpoint (``host:port``); ``secure`` for TLS."""

    def __init__(self, endpoint: str, *, secure: bool) -> None:
        # "host:port", "[v6]:port", or a host alone on the scheme's port, as the minio SDK takes it.
        parts = urlsplit(f"//{endpoint}")
        if not parts.hostname:
            raise ValueError(f"S3 endpoint {endpoint!r} names no host")
        self._host = parts.hostname
        self._port = parts.port or (443 if secure else 80)
        self._ssl = ssl.create_default_context() if secure else None
        self._idle: list[_Connection] = []

    async def put(self, url: Callable[[], str], content: BinaryIO, length: int, content_type: str) -> None:
        """Send ``length`` bytes of ``content`` (seekable, from where it stands) to a presigned PUT
        ``url`` (called once per attempt, so every attempt's signature is fresh)."""
        headers = f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n"
        connection, head = await self._answered("PUT", url, headers, content, length)
        try:
            async with asyncio.timeout(_EXCHANGE_TIMEOUT_S):
                await _read_body(connection.reader, head)  # empty, but it must be read off the connection
        except BaseException:
            connection.close()
            raise
        self._release(connection, head.keep_alive)

    async def get(self, url: Callable[[], str], chunk_size: int) -> AsyncGenerator[bytes, None]:
        """The body of a presigned GET ``url``, in chunks of at most ``chunk_size``; raises
        S3Refused (404 NoSuchKey for a missing object) at the first step."""
        connection, head = await self._answered("GET", url, "", None, 0)
        finished = False
        try:
            async with aclosing(_body_chunks(connection.reader, head, chunk_size)) as chunks:
                while True:
                    async with asyncio.timeout(_EXCHANGE_TIMEOUT_S):
                        chunk = await anext(chunks, None)
                    if chunk is None:
                        break
                    yield chunk
            finished = True
        finally:
            # A body read to its end leaves the connection ready for the next request; one the
            # consumer stopped reading (a client that went away) is in no state to be reused.
            if finished:
                self._release(connection, head.keep_alive)
            else:
                connection.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    async def _answered(
        self, method: str, url: Callable[[], str], headers: str, content: BinaryIO | None, length: int
    ) -> tuple[_Connection, _Head]:
        """The connection and head of the first answer under 300, its body still to read; a
        refusal raises S3Refused, after retries for a 5xx."""
        start = content.tell() if content is not None else 0
        for attempt in range(1, _ATTEMPTS + 1):
            head_bytes = _request_head(method, url(), headers)
            connection = await self._connection()
            try:
                async with asyncio.timeout(_EXCHANGE_TIMEOUT_S):
                    if content is None:
                        connection.writer.write(head_bytes)
                    else:
                        content.seek(start)
                        await _send(connection.writer, head_bytes, content, length)
                    head = await _read_head(connection.reader)
                    if head.status < 300:
                        return connection, head
                    body = await _read_body(connection.reader, head)
            except _CONNECTION_ERRORS as exc:
                connection.close()
                if attempt == _ATTEMPTS:
                    raise S3Unreachable(f"S3 at {self._host}:{self._port}: {exc!r}") from exc
                continue  # most likely a kept-alive connection the server had closed: at once, anew
            except BaseException:
                connection.close()  # cancelled or timed out mid-exchange: the connection is in no known state
                raise
            self._release(connection, head.keep_alive)
            if head.status < 500 or attempt == _ATTEMPTS:
                raise _refusal(method, head.status, body)
            await asyncio.sleep(_BACKOFF_S * attempt)
        raise AssertionError("unreachable")

    def _release(self, connection: _Connection, keep_alive: bool) -> None:
        if keep_alive and len(self._idle) < _MAX_IDLE and not connection.writer.is_closing():
            self._idle.append(connection)
        else:
            connection.close()

    async def _connection(self) -> _Connection:
        loop = asyncio.get_running_loop()
        while self._idle:
            connection = self._idle.pop()
            if connection.loop is loop and not connection.writer.is_closing():
                return connection
            connection.close()  # another event loop's (a test's, a finished asyncio.run's)
        async with asyncio.timeout(_CONNECT_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(
                self._host, self._port, ssl=self._ssl, server_hostname=self._host if self._ssl else None
            )
        return _Connection(loop, reader, writer)


def _request_head(method: str, url: str, headers: str) -> bytes:
    parts = urlsplit(url)
    return f"{method} {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\n{headers}\r\n".encode("latin-1")


async def _send(writer: asyncio.StreamWriter, head: bytes, content: BinaryIO, length: int) -> None:
    first = content.read(min(length, _CHUNK))
    writer.write(head + first)  # one write for a small image: its head and all its bytes
    sent = len(first)
    while sent < length:
        await writer.drain()
        chunk = content.read(min(length - sent, _CHUNK))
        if not chunk:
            raise EOFError(f"the content ended after {sent} of {length} bytes")
        writer.write(chunk)
        sent += len(chunk)
    await writer.drain()


async def _read_head(reader: asyncio.StreamReader) -> _Head:
    raw = await reader.readuntil(b"\r\n\r\n")
    if len(raw) > _MAX_HEAD:
        raise ValueError("answer head too long")
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
    if "content-length" not in headers and not _chunked(headers):
        keep_alive = False  # delimited by the close
    return _Head(int(rest[:3]), headers, keep_alive)


async def _read_body(reader: asyncio.StreamReader, head: _Head) -> bytes:
    """A small answer body (an error's XML, a PUT's empty one), whole."""
    body = bytearray()
    async for chunk in _body_chunks(reader, head, _MAX_ERROR_BODY):
        body += chunk
        if len(body) > _MAX_ERROR_BODY:
            raise ValueError("answer body too long")
    return bytes(body)


async def _body_chunks(reader: asyncio.StreamReader, head: _Head, chunk_size: int) -> AsyncGenerator[bytes, None]:
    if _chunked(head.headers):
        while size := int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16):
            while size > 0:
                chunk = await reader.readexactly(min(size, chunk_size))
                size -= len(chunk)
                yield chunk
            await reader.readexactly(2)  # the CRLF after each chunk
        while (await reader.readuntil(b"\r\n")) != b"\r\n":
            pass  # trailers
    elif "content-length" in head.headers:
        left = int(head.headers["content-length"])
        while left > 0:
            chunk = await reader.read(min(left, chunk_size))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(chunk)
            yield chunk
    else:
        while chunk := await reader.read(chunk_size):
            yield chunk


def _chunked(headers: dict[str, str]) -> bool:
    return "chunked" in headers.get("transfer-encoding", "").lower()


def _refusal(method: str, status: int, body: bytes) -> S3Refused:
    code = _ERROR_CODE.search(body)
    message = _ERROR_MESSAGE.search(body)
    return S3Refused(
        method,
        status,
        code.group(1).decode("utf-8", "replace") if code else "",
        message.group(1).decode("utf-8", "replace") if message else "",
    )
