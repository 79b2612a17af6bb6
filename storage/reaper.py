"""The expiry reaper: deletes each image at its ``expires_at`` and announces it with ImageExpired.

Presigned URLs already stop working at expiry; the reaper removes the bytes and tells the read
model. The bucket's 1-day lifecycle rule only catches what the reaper misses.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog

from schemas import ImageExpired
from schemas.metrics import IMAGES_EXPIRED
from storage.object_store import ExpiringObject, ObjectStore

if TYPE_CHECKING:
    from bus.base import Bus

log = structlog.get_logger(__name__)

_EXPIRY_NAMESPACE = uuid.UUID("8160dd99-a7a8-45b9-9621-27b698d86d10")
_MAX_BACKOFF_S = 60.0
# Objects listed per round trip; a pass keeps listing until a round brings fewer.
_BATCH = 1000


def expiry_message_id(object_key: str) -> str:
    """The same id for every announcement of one key, so re-announcing is de-duplicated."""
    return uuid.uuid5(_EXPIRY_NAMESPACE, object_key).hex


def image_expired(obj: ExpiringObject) -> ImageExpired:
    # occurred_at is the expiry itself, so a re-announcement is identical to the first one.
    return ImageExpired(
        message_id=expiry_message_id(obj.key),
        job_id=obj.job_id,
        image_id=obj.image_id,
        object_key=obj.key,
        occurred_at=obj.expires_at,
    )


async def reap_expired(store: ObjectStore, bus: Bus, now: datetime | None = None) -> int:
    """Announce, then delete, every object expired at ``now``; returns how many.

    Announce first: a crash between the two leaves the object to be announced again on the
    next pass (harmless, de-duplicated), never an image gone without a word to the read model.
    """
    now = now or datetime.now(UTC)
    reaped = 0
    seen: set[str] = set()
    while True:
        batch = await store.list_expired(now, limit=_BATCH)
        fresh = [obj for obj in batch if obj.key not in seen]
        for obj in fresh:
            await bus.publish_event(image_expired(obj))
            await store.delete(obj.key)
            IMAGES_EXPIRED.inc()
            seen.add(obj.key)
            reaped += 1
        # A short batch was the last one. A batch of keys already deleted means the listing
        # lags behind the deletes; stop rather than announce them again in a loop.
        if not fresh or len(batch) < _BATCH:
            return reaped


async def run_reaper(store: ObjectStore, bus: Bus, *, interval_s: float = 5.0, stop: asyncio.Event) -> None:
    """Reap every ``interval_s`` until ``stop`` is set; S3 or bus errors back off and retry."""
    failures = 0
    log.info("reaper.started", bucket=store.bucket, interval_s=interval_s)
    while not stop.is_set():
        try:
            reaped = await reap_expired(store, bus)
        except Exception as exc:
            failures += 1
            delay = max(interval_s, min(interval_s * 2**failures, _MAX_BACKOFF_S))
            # The traceback once per streak; a broker down for minutes should not flood the log.
            log.warning(
                "reaper.pass_failed", error=repr(exc), failures=failures, retry_in_s=delay, exc_info=failures == 1
            )
        else:
            if reaped:
                log.info("reaper.reaped", count=reaped)
            failures, delay = 0, interval_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
    log.info("reaper.stopped")
