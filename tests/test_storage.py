"""ObjectStore against a real S3 server (SeaweedFS weed mini): streaming, keys, presigned URLs."""

from __future__ import annotations

import asyncio
import io
import random
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from imagebus.s3_server import S3Server
from storage.object_store import PART_SIZE, ObjectMissing, ObjectStore, S3Config, StoredObject
from tests.fixtures.s3 import raw_client

NOW = datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)
# Signing URLs is pure computation: a store pointed at a port where nothing listens will do.
OFFLINE = ObjectStore(S3Config("127.0.0.1:1", "offline-key", "offline-secret"))


class OneWayReader:
    """Only read(), like a pipe from the image encoder; remembers the largest read asked for."""

    def __init__(self, data: bytes) -> None:
        self._buffer = io.BytesIO(data)
        self.largest_read = 0

    def read(self, size: int = -1) -> bytes:
        self.largest_read = max(self.largest_read, size if size >= 0 else 1 << 62)
        return self._buffer.read(size)


async def read_all(store: ObjectStore, key: str, chunk_size: int = 64 * 1024) -> bytes:
    return b"".join([chunk async for chunk in store.get_stream(key, chunk_size)])


def key_for(expires_at: datetime, job_id: str = "job1", image_id: str = "img1") -> str:
    return ObjectStore.image_key(job_id, image_id, expires_at, "image/png")


# --- streaming -----------------------------------------------------------------------------


async def test_unknown_length_goes_up_in_parts_without_reading_it_whole(
    object_store: ObjectStore, storage_config: S3Config
) -> None:
    data = random.Random(1).randbytes(2 * PART_SIZE + 12_345)
    reader = OneWayReader(data)

    stored = await object_store.put_stream("big.png", reader, content_type="image/png")  # type: ignore[arg-type]

    assert stored == StoredObject(key="big.png", size_bytes=len(data))
    assert reader.largest_read <= PART_SIZE + 1
    # A multipart upload's ETag ends in "-<number of parts>".
    etag = raw_client(storage_config).stat_object(storage_config.bucket, "big.png").etag
    assert etag is not None and etag.endswith("-3")
    assert await read_all(object_store, "big.png") == data


async def test_known_length_and_bytes_round_trip(object_store: ObjectStore, storage_config: S3Config) -> None:
    data = random.Random(2).randbytes(300_000)

    streamed = await object_store.put_stream("known.jpg", io.BytesIO(data), content_type="image/jpeg", length=len(data))
    small = await object_store.put_bytes("small.png", b"\x89PNG tiny", content_type="image/png")

    assert streamed == StoredObject("known.jpg", len(data))
    assert small == StoredObject("small.png", 9)
    assert await read_all(object_store, "known.jpg") == data
    assert await read_all(object_store, "small.png") == b"\x89PNG tiny"
    stat = raw_client(storage_config).stat_object(storage_config.bucket, "known.jpg")
    assert stat.content_type == "image/jpeg"


async def test_get_stream_yields_chunks_of_at_most_chunk_size(object_store: ObjectStore) -> None:
    data = bytes(range(256)) * 100
    await object_store.put_bytes("chunks.png", data, content_type="image/png")

    chunks = [chunk async for chunk in object_store.get_stream("chunks.png", chunk_size=4096)]

    assert b"".join(chunks) == data
    assert len(chunks) >= len(data) // 4096 and all(len(chunk) <= 4096 for chunk in chunks)


async def test_missing_object_raises_before_the_first_chunk(object_store: ObjectStore) -> None:
    stream = object_store.get_stream("never/stored.png")
    with pytest.raises(ObjectMissing):
        await anext(stream)


async def test_delete_is_idempotent(object_store: ObjectStore) -> None:
    await object_store.put_bytes("doomed.png", b"x", content_type="image/png")

    await object_store.delete("doomed.png")
    await object_store.delete("doomed.png")
    await object_store.delete("never/stored.png")

    with pytest.raises(ObjectMissing):
        await read_all(object_store, "doomed.png")


# --- bucket --------------------------------------------------------------------------------


async def test_ensure_bucket_is_idempotent_and_sets_one_backstop_rule(
    object_store: ObjectStore, storage_config: S3Config
) -> None:
    await object_store.ensure_bucket()
    await object_store.ensure_bucket()

    lifecycle = raw_client(storage_config).get_bucket_lifecycle(storage_config.bucket)
    assert lifecycle is not None  # SeaweedFS 4.x accepts lifecycle rules; MinIO does too
    [rule] = lifecycle.rules
    assert rule.expiration is not None and rule.expiration.days == 1


async def test_ping(object_store: ObjectStore, s3_server: S3Server, storage_config: S3Config) -> None:
    assert await object_store.ping() is True
    wrong_secret = ObjectStore(S3Config(s3_server.endpoint, s3_server.access_key, "wrong", storage_config.bucket))
    assert await wrong_secret.ping() is False
    no_bucket = ObjectStore(S3Config(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, "nobucket"))
    assert await no_bucket.ping() is False
    nobody_there = ObjectStore(S3Config("127.0.0.1:1", "key", "secret"))
    assert await nobody_there.ping() is False


# --- keys ----------------------------------------------------------------------------------


def test_image_key_layout() -> None:
    expires_at = datetime(2026, 1, 2, 3, 4, 5, 678_901, tzinfo=UTC)

    assert ObjectStore.image_key("job-1", "img_2", expires_at, "image/png") == "1767323045678/job-1/img_2.png"
    assert ObjectStore.image_key("j", "i", expires_at, "image/jpeg").endswith("/j/i.jpg")
    assert ObjectStore.image_key("j", "i", datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC), "image/webp") == (
        "0000000001000/j/i.webp"
    )


def test_image_keys_sort_by_expiry() -> None:
    start = datetime(1970, 1, 1, tzinfo=UTC)
    # Across every change in the number of digits, and millisecond steps.
    moments = [start + timedelta(milliseconds=10**power) for power in range(12)]
    moments += [NOW + timedelta(milliseconds=step) for step in (0, 1, 2, 999, 1000, 86_400_000)]
    shuffled = random.Random(3).sample(moments, len(moments))

    keys = [key_for(moment, job_id=f"job{index}") for index, moment in enumerate(shuffled)]

    assert [moment for _, moment in sorted(zip(keys, shuffled, strict=True))] == sorted(moments)


@pytest.mark.parametrize(("job_id", "image_id"), [("a/b", "i"), ("j", "x.y"), ("j", ""), ("j k", "i")])
def test_image_key_rejects_ids_that_would_break_the_layout(job_id: str, image_id: str) -> None:
    with pytest.raises(ValueError):
        ObjectStore.image_key(job_id, image_id, NOW, "image/png")


def test_image_key_rejects_naive_datetimes() -> None:
    with pytest.raises(ValueError):
        ObjectStore.image_key("j", "i", datetime(2026, 1, 1), "image/png")


# --- presigned URLs ------------------------------------------------------------------------


def url_window(url: str) -> tuple[datetime, timedelta]:
    """When a presigned URL was signed and how long it lives, from its query string."""
    query = parse_qs(urlsplit(url).query)
    signed_at = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    return signed_at, timedelta(seconds=int(query["X-Amz-Expires"][0]))


async def test_presigned_url_works_until_expiry_and_not_after(object_store: ObjectStore) -> None:
    now = datetime.now(UTC)
    expires_at = now + timedelta(seconds=2.5)
    key = key_for(expires_at)
    await object_store.put_bytes(key, b"pixels", content_type="image/png")

    url = object_store.presigned_get_url(key, expires_at)
    assert url is not None
    signed_at, lifetime = url_window(url)
    assert signed_at + lifetime <= expires_at

    async with httpx.AsyncClient() as http:
        before = await http.get(url)
        assert (before.status_code, before.content) == (200, b"pixels")
        assert before.headers["content-type"] == "image/png"

        await asyncio.sleep((signed_at + lifetime - datetime.now(UTC)).total_seconds() + 0.3)
        after = await http.get(url)
        assert after.status_code == 403


@pytest.mark.parametrize("now_fraction_ms", [0, 1, 250, 500, 678, 679, 999])
@pytest.mark.parametrize("expires_in_ms", [1_000, 1_001, 1_500, 2_000, 600_000, 600_321])
def test_presigned_url_never_outlives_expires_at(now_fraction_ms: int, expires_in_ms: int) -> None:
    now = NOW.replace(microsecond=now_fraction_ms * 1000)
    expires_at = now + timedelta(milliseconds=expires_in_ms)

    url = OFFLINE.presigned_get_url("k.png", expires_at, now=now)

    assert url is not None
    signed_at, lifetime = url_window(url)
    assert signed_at <= now and lifetime >= timedelta(seconds=1)
    # Ends by expires_at, and not a whole second earlier than it could.
    assert expires_at - timedelta(seconds=1) < signed_at + lifetime <= expires_at


@pytest.mark.parametrize("expires_in_ms", [-60_000, -1, 0, 1, 321])
def test_no_url_once_expired_or_too_close_to_expiry(expires_in_ms: int) -> None:
    # NOW is 0.678 s into its second: 0.321 s later is still the same second, too short for any URL.
    expires_at = NOW + timedelta(milliseconds=expires_in_ms)
    assert OFFLINE.presigned_get_url("k.png", expires_at, now=NOW) is None


def test_presigned_url_points_at_the_public_endpoint() -> None:
    public = ObjectStore(
        S3Config("127.0.0.1:1", "key", "secret", bucket="imagebus", public_endpoint="https://images.example.com:9443")
    )
    url = public.presigned_get_url("123/j/i.png", NOW + timedelta(minutes=10), now=NOW)

    assert url is not None and url.startswith("https://images.example.com:9443/imagebus/123/j/i.png?")
    assert url_window(url) == (NOW.replace(microsecond=0), timedelta(seconds=600))


# --- expiry listing ------------------------------------------------------------------------


async def test_list_expired_returns_only_expired_keys_in_expiry_order(object_store: ObjectStore) -> None:
    offsets_s = [-3600, -5, -0.001, 0, 0.001, 60, 600]
    shuffled = random.Random(4).sample(offsets_s, len(offsets_s))
    keys = {}
    for index, offset in enumerate(shuffled):
        keys[offset] = key_for(NOW + timedelta(seconds=offset), job_id=f"job{index}", image_id=f"img{index}")
        await object_store.put_bytes(keys[offset], b"x", content_type="image/png")
    await object_store.put_bytes("0000000000000/not an/imagebus key", b"x", content_type="text/plain")

    expired = await object_store.list_expired(NOW)

    assert [item.key for item in expired] == [keys[offset] for offset in (-3600, -5, -0.001, 0)]
    first = expired[0]
    index = shuffled.index(-3600)
    assert (first.job_id, first.image_id) == (f"job{index}", f"img{index}")
    assert first.expires_at == (NOW - timedelta(hours=1)).replace(microsecond=678_000)
    assert [item.key for item in await object_store.list_expired(NOW, limit=2)] == [keys[-3600], keys[-5]]
