"""The expiry reaper against real S3 and the in-memory bus: announce, then delete, exactly what expired."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import UTC, datetime, timedelta

import pytest

from bus import Bus, connect_bus
from schemas import Event, ImageExpired
from storage.object_store import ObjectMissing, ObjectStore
from storage.reaper import expiry_message_id, reap_expired, run_reaper

NOW = datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)


@pytest.fixture
async def bus() -> AsyncIterator[Bus]:
    bus = await connect_bus(f"memory://{uuid.uuid4().hex}")
    yield bus
    await bus.close()


async def logged_events(bus: Bus) -> list[Event]:
    async with bus.read_events(idle_timeout_s=0.2) as events:
        return [logged.event async for logged in events]


async def store_image(store: ObjectStore, job_id: str, image_id: str, expires_at: datetime) -> str:
    key = ObjectStore.image_key(job_id, image_id, expires_at, "image/png")
    await store.put_bytes(key, b"png bytes", content_type="image/png")
    return key


async def exists(store: ObjectStore, key: str) -> bool:
    async with aclosing(store.get_stream(key)) as stream:
        try:
            await anext(stream, b"")
            return True
        except ObjectMissing:
            return False


async def test_reaps_only_expired_images_and_announces_each_once(object_store: ObjectStore, bus: Bus) -> None:
    expired = {
        ("job-a", "img-1"): await store_image(object_store, "job-a", "img-1", NOW - timedelta(minutes=5)),
        ("job-a", "img-2"): await store_image(object_store, "job-a", "img-2", NOW - timedelta(seconds=1)),
        ("job-b", "img-3"): await store_image(object_store, "job-b", "img-3", NOW),
    }
    alive = [
        await store_image(object_store, "job-b", "img-4", NOW + timedelta(milliseconds=1)),
        await store_image(object_store, "job-c", "img-5", NOW + timedelta(minutes=10)),
    ]

    assert await reap_expired(object_store, bus, now=NOW) == 3

    events = await logged_events(bus)
    assert all(isinstance(event, ImageExpired) for event in events)
    announced = {(event.job_id, event.image_id): event for event in events if isinstance(event, ImageExpired)}
    assert len(events) == len(announced) == 3
    assert {ids: event.object_key for ids, event in announced.items()} == expired
    for event in announced.values():
        assert event.message_id == expiry_message_id(event.object_key)
    assert announced[("job-a", "img-1")].occurred_at == NOW - timedelta(minutes=5)
    for key in expired.values():
        assert not await exists(object_store, key)
    for key in alive:
        assert await exists(object_store, key)

    # A second pass finds nothing: no deletes, no events.
    assert await reap_expired(object_store, bus, now=NOW) == 0
    assert len(await logged_events(bus)) == 3


class CrashesBeforeDelete(ObjectStore):
    """Dies between announcing and deleting, once: the window at-least-once must cover."""

    crashed = False

    async def delete(self, key: str) -> None:
        if not self.crashed:
            self.crashed = True
            raise ConnectionError("S3 went away")
        await super().delete(key)


async def test_a_crash_between_announce_and_delete_re_announces_harmlessly(object_store: ObjectStore, bus: Bus) -> None:
    key = await store_image(object_store, "job-x", "img-x", NOW - timedelta(seconds=30))
    crashing = CrashesBeforeDelete(object_store.config)

    with pytest.raises(ConnectionError):
        await reap_expired(crashing, bus, now=NOW)
    assert await exists(object_store, key)  # announced, not yet deleted

    assert await reap_expired(crashing, bus, now=NOW) == 1
    assert not await exists(object_store, key)
    # Announced twice with one message id: the bus keeps one (NATS de-duplicates the same way).
    [event] = await logged_events(bus)
    assert isinstance(event, ImageExpired) and event.object_key == key


class FlakyBus:
    """Refuses the first ``failures`` publishes, like a broker restarting."""

    def __init__(self, inner: Bus, failures: int) -> None:
        self.inner = inner
        self.failures = failures
        self.options = inner.options

    async def publish_event(self, event: Event) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("broker unavailable")
        await self.inner.publish_event(event)


async def test_run_reaper_survives_bus_errors_and_stops_on_request(object_store: ObjectStore, bus: Bus) -> None:
    key = await store_image(object_store, "job-r", "img-r", datetime.now(UTC) - timedelta(seconds=1))
    stop = asyncio.Event()
    flaky = FlakyBus(bus, failures=2)
    task = asyncio.create_task(run_reaper(object_store, flaky, interval_s=0.02, stop=stop))  # type: ignore[arg-type]

    for _ in range(200):
        if not await exists(object_store, key):
            break
        await asyncio.sleep(0.02)

    stop.set()
    await asyncio.wait_for(task, timeout=2.0)
    assert flaky.failures == 0
    assert not await exists(object_store, key)
    assert [event.job_id for event in await logged_events(bus)] == ["job-r"]
