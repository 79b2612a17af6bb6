"""Image bytes in S3 (MinIO in production, SeaweedFS locally) through the minio SDK.

Keys start with the image's expiry time, so the bucket lists in expiry order and the reaper
reads only the expired front of it. The SDK blocks; every call runs in a worker thread, but for
the ones made once per image, an upload of known length and a download: those run on the event
loop (``storage.async_s3``), signed by the SDK.
"""

from __future__ import annotations

import asyncio
import functools
import io
import re
from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import BinaryIO, cast
from urllib.parse import urlsplit

import structlog
import urllib3
from minio import Minio
from minio.commonconfig import ENABLED, Filter
from minio.error import S3Error
from minio.lifecycleconfig import AbortIncompleteMultipartUpload, Expiration, LifecycleConfig, Rule

from storage.async_s3 import AsyncS3, S3Refused

log = structlog.get_logger(__name__)

# The S3 minimum part size: the most one unknown-length upload holds in memory at a time.
PART_SIZE = 5 * 1024 * 1024
# S3 refuses presigned URLs that live longer than this.
MAX_URL_LIFETIME = timedelta(days=7)
BACKSTOP_RULE_ID = "imagebus-expiry-backstop"
# The presigned URL of one of our own requests: signed for each attempt, it only has to outlive it.
_REQUEST_URL_LIFETIME = timedelta(minutes=5)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Ids are single bus-subject tokens (see bus/_names.py); anything else in the bucket is not ours.
_ID = r"[A-Za-z0-9_-]+"
_KEY = re.compile(rf"^(?P<ms>\d{{13}})/(?P<job_id>{_ID})/(?P<image_id>{_ID})\.[a-z0-9]+$")
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject"})
_EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "image/gif": "gif",
    "image/avif": "avif",
}


@dataclass(frozen=True)
class S3Config:
    endpoint: str  # "host:port"
    access_key: str
    secret_key: str
    bucket: str = "imagebus"
    secure: bool = False
    region: str = "us-east-1"
    # "host:port" or "scheme://host:port" put in presigned URLs handed to clients; default: endpoint.
    public_endpoint: str | None = None


@dataclass(frozen=True)
class StoredObject:
    key: str
    size_bytes: int


@dataclass(frozen=True)
class ExpiringObject:
    key: str
    job_id: str
    image_id: str
    expires_at: datetime


class ObjectMissing(Exception):
    """No object under this key (never stored, reaped, or deleted)."""


class ObjectStore:
    """One bucket of images. Cheap to build (no network until the first call)."""

    def __init__(self, config: S3Config) -> None:
        self.config = config
        self.bucket = config.bucket
        # Bounded timeouts (the SDK's default waits five minutes per read) and enough pooled
        # connections for the threads we run at once, so none is opened and dropped per call.
        self._client = Minio(
            config.endpoint,
            access_key=config.access_key,
            secret_key=config.secret_key,
            secure=config.secure,
            region=config.region,
            http_client=urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=5.0, read=60.0),
                maxsize=16,
                retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
            ),
        )
        # Health checks must answer fast, so no retries there.
        self._probe = Minio(
            config.endpoint,
            access_key=config.access_key,
            secret_key=config.secret_key,
            secure=config.secure,
            region=config.region,
            http_client=urllib3.PoolManager(timeout=urllib3.Timeout(connect=2.0, read=3.0), retries=False),
        )
        self._signer = _signing_client(config)
        self._requests = AsyncS3(config.endpoint, secure=config.secure)

    # --- bucket ----------------------------------------------------------------------------

    async def ensure_bucket(self) -> None:
        """Create the bucket if needed and add the 1-day expiry rule (the reaper's backstop)."""
        await asyncio.to_thread(self._ensure_bucket)

    def _ensure_bucket(self) -> None:
        if not self._client.bucket_exists(self.bucket):
            try:
                self._client.make_bucket(self.bucket)
            except S3Error as exc:
                # Another replica created it between our check and our call.
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        try:
            current = self._client.get_bucket_lifecycle(self.bucket)
            rules = list(current.rules) if current else []
            if any(rule.rule_id == BACKSTOP_RULE_ID for rule in rules):
                return
            # Added beside, not instead of, any rules an operator set on the bucket.
            rules.append(_backstop_rule())
            self._client.set_bucket_lifecycle(self.bucket, LifecycleConfig(rules))
        except S3Error as exc:
            log.warning(
                "s3.lifecycle_unsupported",
                bucket=self.bucket,
                code=exc.code,
                detail="images are still deleted by the reaper, only the backstop is missing",
            )

    async def ping(self) -> bool:
        """True when the server answers, accepts our credentials and has our bucket."""
        try:
            return await asyncio.to_thread(self._probe.bucket_exists, self.bucket)
        except Exception:
            return False

    # --- keys and URLs ---------------------------------------------------------------------

    @staticmethod
    def image_key(job_id: str, image_id: str, expires_at: datetime, content_type: str) -> str:
        """``<expiry epoch ms, 13 digits>/<job_id>/<image_id>.<ext>``: keys sort by expiry."""
        for value in (job_id, image_id):
            if not re.fullmatch(_ID, value):
                raise ValueError(f"id {value!r} must be letters, digits, '_' or '-' only")
        # Cosmetic only (clients see the stored Content-Type), so an unknown type gets "bin".
        extension = _EXTENSIONS.get(content_type.split(";", 1)[0].strip().lower(), "bin")
        return f"{_epoch_ms(expires_at):013d}/{job_id}/{image_id}.{extension}"

    def presigned_get_url(self, key: str, expires_at: datetime, now: datetime | None = None) -> str | None:
        """A GET URL for ``key`` that stops working no later than ``expires_at``; None once expired.

        The URL's lifetime counts from its signing time, which S3 truncates to the whole second,
        so we sign at that truncated time and round the remaining seconds down. Should less than
        one whole second be left, no URL could end in time, and the answer is None.
        """
        signed_at = _aware(now or datetime.now(UTC)).replace(microsecond=0)
        whole_seconds_left = (_aware(expires_at) - signed_at) // timedelta(seconds=1)
        if whole_seconds_left < 1:
            return None
        lifetime = min(timedelta(seconds=whole_seconds_left), MAX_URL_LIFETIME)
        # Pure computation: the signing client knows its region, so it never calls the server.
        return self._signer.presigned_get_object(self.bucket, key, expires=lifetime, request_date=signed_at)

    # --- objects ---------------------------------------------------------------------------

    async def put_stream(self, key: str, reader: BinaryIO, *, content_type: str, length: int = -1) -> StoredObject:
        """Stream ``reader`` into ``key``: of a known length (seekable, at its start) in one PUT on
        the event loop; of unknown length (-1) in 5 MiB multipart parts through the SDK's thread."""
        if length >= 0:
            url = functools.partial(self._client.presigned_put_object, self.bucket, key, expires=_REQUEST_URL_LIFETIME)
            await self._requests.put(url, reader, length, content_type)
            return StoredObject(key=key, size_bytes=length)
        counted = _CountingReader(reader)
        await asyncio.to_thread(
            self._client.put_object,
            self.bucket,
            key,
            cast(BinaryIO, counted),  # the SDK only ever calls read()
            length,
            content_type=content_type,
            part_size=PART_SIZE if length < 0 else 0,
            # One part in flight: memory stays at one part per upload, not one per upload thread.
            num_parallel_uploads=1,
        )
        return StoredObject(key=key, size_bytes=counted.count)

    async def put_bytes(self, key: str, data: bytes, *, content_type: str) -> StoredObject:
        return await self.put_stream(key, io.BytesIO(data), content_type=content_type, length=len(data))

    async def get_stream(self, key: str, chunk_size: int = 64 * 1024) -> AsyncGenerator[bytes, None]:
        """The object's bytes in chunks, read on the event loop; raises ObjectMissing on the first
        step if there is none."""
        url = functools.partial(self._client.presigned_get_object, self.bucket, key, expires=_REQUEST_URL_LIFETIME)
        try:
            async with aclosing(self._requests.get(url, chunk_size)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except S3Refused as exc:
            if exc.code in _MISSING_CODES or (exc.status == 404 and not exc.code):
                raise ObjectMissing(key) from exc
            raise

    async def delete(self, key: str) -> None:
        """Remove ``key``; removing what is not there is fine (S3 answers 204 either way)."""
        await asyncio.to_thread(self._client.remove_object, self.bucket, key)

    async def list_expired(self, now: datetime, limit: int = 1000) -> list[ExpiringObject]:
        """Objects whose expiry is at or before ``now``, oldest first, at most ``limit``."""
        return await asyncio.to_thread(self._list_expired, _epoch_ms(now), limit)

    def _list_expired(self, now_ms: int, limit: int) -> list[ExpiringObject]:
        expired: list[ExpiringObject] = []
        for key in self._keys_in_order():
            match = _KEY.match(key)
            if match is None:
                continue  # not ours (an operator's file): never reap it
            if int(match["ms"]) > now_ms:
                break  # every later key expires later still
            expired.append(
                ExpiringObject(
                    key=key,
                    job_id=match["job_id"],
                    image_id=match["image_id"],
                    expires_at=_EPOCH + timedelta(milliseconds=int(match["ms"])),
                )
            )
            if len(expired) >= limit:
                break
        return expired

    def _keys_in_order(self) -> Iterator[str]:
        # Listing pages lazily, so stopping early also stops fetching pages.
        for item in self._client.list_objects(self.bucket, recursive=True):
            if item.object_name is not None:
                yield item.object_name


class _CountingReader:
    """Counts what the SDK reads, for StoredObject.size_bytes when the length was unknown."""

    def __init__(self, reader: BinaryIO) -> None:
        self._reader = reader
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._reader.read(size)
        self.count += len(chunk)
        return chunk


def s3_client(config: S3Config) -> Minio:
    """A plain client for the same server (catalog files kept in other buckets: LoRAs)."""
    return Minio(
        config.endpoint,
        access_key=config.access_key,
        secret_key=config.secret_key,
        secure=config.secure,
        region=config.region,
    )


def _signing_client(config: S3Config) -> Minio:
    endpoint, secure = config.public_endpoint or config.endpoint, config.secure
    if "://" in endpoint:
        parts = urlsplit(endpoint)
        endpoint, secure = parts.netloc, parts.scheme == "https"
    return Minio(
        endpoint,
        access_key=config.access_key,
        secret_key=config.secret_key,
        secure=secure,
        region=config.region,
    )


def _backstop_rule() -> Rule:
    return Rule(
        ENABLED,
        rule_filter=Filter(prefix=""),
        rule_id=BACKSTOP_RULE_ID,
        expiration=Expiration(days=1),
        # Parts of uploads a crashed worker never finished would otherwise stay forever.
        abort_incomplete_multipart_upload=AbortIncompleteMultipartUpload(days_after_initiation=1),
    )


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError(f"timezone-aware datetime required, got {value!r}")
    return value


def _epoch_ms(value: datetime) -> int:
    # Integer arithmetic on timedeltas: float timestamps lose the last millisecond.
    return (_aware(value) - _EPOCH) // timedelta(milliseconds=1)
