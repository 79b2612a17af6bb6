"""PUT of an object whose length is known, on the event loop, over kept-alive connections.

Every image a worker stores goes up once, and through the minio SDK each upload was a hop to a
thread, urllib3 and a SHA-256 of the payload: about 0.8 CPU-ms an image, a fifth of the remote
worker's whole cost per job. Here the request is signed by a presigned URL (the minio SDK signs it,
the payload unsigned as S3 allows), and the bytes go out on an asyncio connection: about 0.25 CPU-ms
and a little less latency. Only what a PUT answers is parsed: a status line, headers, and a body
sized by Content-Length or chunked. Anything unusual closes the connection rather than guessing.

A PUT is idempotent, so a connection the server closed while idle (the write goes out, the read
finds nothing) and a 5xx are retried on a fresh connection, a few times.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlsplit

_CHUNK = 256 * 1024
_MAX_HEAD = 64 * 1024
_CONNECT_TIMEOUT_S = 5.0
# A whole exchange (the body going up included); the SDK's read timeout was the same.
_EXCHANGE_TIMEOUT_S = 60.0
_ATTEMPTS = 4
_BACKOFF_S = 0.2
_MAX_IDLE = 16
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,128})</Code>")
_ERROR_MESSAGE = re.compile(rb"<Message>([^<]{1,512})</Message>")


class S3PutError(Exception):
    """The server refused the PUT (``status`` 4xx/5xx) with S3's error ``code`` when it gave one."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"S3 PUT answered {status} {code}: {message}".rstrip(": "))
        self.status = status
        self.code = code


class _Broken(Exception):
    """The connection failed before a whole answer arrived: retry on a fresh one."""


@dataclass
class _Connection:
    loop: asyncio.AbstractEventLoop
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        if not self.loop.is_closed():
            self.writer.close()


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    keep_alive: bool


class AsyncPutter:
    """PUTs to one S3 endpoint (``host:port``); ``secure`` for TLS."""

    def __init__(self, endpoint: str, *, secure: bool) -> None:
        host, _, port = endpoint.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self._ssl = ssl.create_default_context() if secure else None
        self._idle: list[_Connection] = []

    async def put(self, url: Callable[[], str], content: BinaryIO, length: int, content_type: str) -> None:
        """Send ``length`` bytes of ``content`` (seekable, at its start) to a presigned PUT ``url``
        (called once per attempt, so every attempt's signature is fresh)."""
        start = content.tell()
        for attempt in range(1, _ATTEMPTS + 1):
            content.seek(start)
            parts = urlsplit(url())
            head = (
                f"PUT {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
            ).encode("latin-1")
            try:
                answer = await self._exchange(head, content, length)
            except _Broken:
                if attempt == _ATTEMPTS:
                    raise
                continue  # a kept-alive connection the server had closed: at once, on a new one
            if answer.status < 300:
                return
            if answer.status < 500 or attempt == _ATTEMPTS:
                raise _refusal(answer)
            await asyncio.sleep(_BACKOFF_S * attempt)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    async def _exchange(self, head: bytes, content: BinaryIO, length: int) -> _Answer:
        connection = await self._connection()
        try:
            async with asyncio.timeout(_EXCHANGE_TIMEOUT_S):
                await _send(connection.writer, head, content, length)
                answer = await _answer(connection.reader)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            connection.close()
            raise _Broken(repr(exc)) from exc
        except BaseException:
            connection.close()  # cancelled or timed out mid-exchange: the connection is in no known state
            raise
        if answer.keep_alive and len(self._idle) < _MAX_IDLE:
            self._idle.append(connection)
        else:
            connection.close()
        return answer

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


async def _send(writer: asyncio.StreamWriter, head: bytes, content: BinaryIO, length: int) -> None:
    first = content.read(min(length, _CHUNK))
    writer.write(head + first)  # one write for a small image: its head and all its bytes
    sent = len(first)
    while sent < length:
        await writer.drain()
        chunk = content.read(min(length - sent, _CHUNK))
        if not chunk:
            raise ValueError(f"the content ended after {sent} of {length} bytes")
        writer.write(chunk)
        sent += len(chunk)
    await writer.drain()


async def _answer(reader: asyncio.StreamReader) -> _Answer:
    raw = await reader.readuntil(b"\r\n\r\n")
    if len(raw) > _MAX_HEAD:
        raise ValueError("answer head too long")
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    status = int(rest[:3])
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _chunked(reader)
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body, keep_alive = await reader.read(_MAX_HEAD), False  # delimited by the close
    return _Answer(status, body, keep_alive)


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
        if size == 0:
            await _trailer(reader)
            return bytes(body)
        body += (await reader.readexactly(size + 2))[:-2]
        if len(body) > _MAX_HEAD:
            raise ValueError("answer body too long")


async def _trailer(reader: asyncio.StreamReader) -> None:
    while (await reader.readuntil(b"\r\n")) != b"\r\n":
        pass


def _refusal(answer: _Answer) -> S3PutError:
    code = _ERROR_CODE.search(answer.body)
    message = _ERROR_MESSAGE.search(answer.body)
    return S3PutError(
        answer.status,
        code.group(1).decode("utf-8", "replace") if code else "",
        message.group(1).decode("utf-8", "replace") if message else "",
    )
