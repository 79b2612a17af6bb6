"""Uploads of a known length and streamed downloads on the event loop (storage.async_s3): against the
real local S3 server for what it answers, and against a scripted HTTP server for what an S3 server
may do to a kept-alive connection (close it while idle, answer 503, answer chunked)."""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field, replace

import pytest

from storage.async_s3 import AsyncS3, S3Refused
from storage.object_store import ObjectMissing, ObjectStore, S3Config

ERROR_XML = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>Please reduce your rate</Message></Error>"


# --- against the local S3 server -----------------------------------------------------------


async def test_a_wrong_secret_is_refused_with_its_s3_code(storage_config: S3Config, object_store: ObjectStore) -> None:
    store = ObjectStore(replace(storage_config, secret_key="not-the-secret"))
    with pytest.raises(S3Refused) as refused:
        await store.put_bytes("k.png", b"png", content_type="image/png")
    assert refused.value.status == 403
    assert refused.value.code == "SignatureDoesNotMatch"


async def test_uploads_one_after_another_share_one_connection(object_store: ObjectStore) -> None:
    opened = 0
    real_open = asyncio.open_connection

    async def counting_open(*args: object, **kwargs: object) -> object:
        nonlocal opened
        opened += 1
        return await real_open(*args, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(asyncio, "open_connection", counting_open)
        for index in range(5):
            await object_store.put_bytes(f"seq-{index}.png", b"x" * 1000, content_type="image/png")
    assert opened == 1  # the fixture's store is new: one connection, then kept alive


async def test_a_download_left_half_read_does_not_spoil_the_next(object_store: ObjectStore) -> None:
    data = random.Random(3).randbytes(300_000)
    await object_store.put_bytes("half.png", data, content_type="image/png")
    await object_store.put_bytes("whole.png", data[:1000], content_type="image/png")

    async with aclosing(object_store.get_stream("half.png", chunk_size=1024)) as chunks:
        assert await anext(chunks) == data[:1024]  # and then the client goes away

    assert b"".join([chunk async for chunk in object_store.get_stream("whole.png")]) == data[:1000]
    with pytest.raises(ObjectMissing):
        await anext(object_store.get_stream("never-stored.png"))


def test_an_endpoint_without_a_port_uses_the_schemes() -> None:
    # As the minio SDK takes it (a cloud endpoint on 443); nothing is dialled until a request.
    assert ObjectStore(S3Config("s3.example.com", "key", "secret", secure=True)).bucket == "imagebus"
    with pytest.raises(ValueError, match="names no host"):
        AsyncS3(":9000", secure=False)


# --- against a scripted server -------------------------------------------------------------


@dataclass
class Scripted:
    """An HTTP/1.1 server answering PUTs from a script: each entry is (head, body, close after)."""

    script: list[tuple[bytes, bytes, bool]]
    bodies: list[bytes] = field(default_factory=list)
    connections: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.script:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,  # a GET
                )
                self.bodies.append(await reader.readexactly(length))
                answer_head, body, close = self.script.pop(0)
                writer.write(answer_head + body)
                await writer.drain()
                if close:
                    break
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()


@asynccontextmanager
async def scripted(*script: tuple[bytes, bytes, bool]) -> AsyncIterator[tuple[Scripted, AsyncS3]]:
    server = Scripted(list(script))
    listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    s3 = AsyncS3(f"127.0.0.1:{port}", secure=False)
    try:
        yield server, s3
    finally:
        await s3.close()
        listening.close()
        await listening.wait_closed()


def url() -> str:
    return "http://127.0.0.1/bucket/key.png?X-Amz-Signature=abc"


OK = (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"", False)


async def test_a_connection_closed_while_idle_is_replaced_at_once() -> None:
    # The server closes after its first answer without saying so, as an idle timeout would.
    closing_ok = (OK[0], OK[1], True)
    async with scripted(closing_ok, OK) as (server, s3):
        await s3.put(url, io.BytesIO(b"first"), 5, "image/png")
        await asyncio.sleep(0.05)  # the close reaches us while the connection is idle
        await s3.put(url, io.BytesIO(b"second"), 6, "image/png")
    assert server.bodies == [b"first", b"second"]
    assert server.connections == 2


async def test_a_503_is_retried_with_the_whole_body_again() -> None:
    busy = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n\r\n" % len(ERROR_XML), ERROR_XML, False)
    async with scripted(busy, OK) as (server, s3):
        content = io.BytesIO(b"head-image-bytes")
        content.seek(5)  # the upload starts where the content stands
        await s3.put(url, content, 11, "image/png")
    assert server.bodies == [b"image-bytes", b"image-bytes"]


async def test_a_chunked_refusal_carries_its_s3_code() -> None:
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(ERROR_XML), ERROR_XML)
    refusal = (b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n", chunked, False)
    async with scripted(refusal) as (_, s3):
        with pytest.raises(S3Refused) as refused:
            await s3.put(url, io.BytesIO(b"x"), 1, "image/png")
    assert (refused.value.status, refused.value.code) == (403, "SlowDown")
    assert "Please reduce your rate" in str(refused.value)


async def test_a_chunked_download_streams_in_pieces_of_at_most_the_chunk_size() -> None:
    chunked = b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"
    answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", chunked, False)
    async with scripted(answer, OK) as (server, s3):
        pieces = [piece async for piece in s3.get(url, 4)]
        await s3.put(url, io.BytesIO(b"next"), 4, "image/png")  # the same connection, ready again
    assert pieces == [b"hell", b"o", b", wo", b"rld"]
    assert server.connections == 1


async def test_a_download_on_a_connection_closed_while_idle_is_replaced_at_once() -> None:
    closing_ok = (OK[0], OK[1], True)
    body = (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"bytes", False)
    async with scripted(closing_ok, body) as (server, s3):
        await s3.put(url, io.BytesIO(b"first"), 5, "image/png")
        await asyncio.sleep(0.05)
        assert [piece async for piece in s3.get(url, 1024)] == [b"bytes"]
    assert server.connections == 2
