"""The ingress's one bus subscription per process (ingress/live.py): fan-out to streams, the shared
state timer, live steps laid over the read model; and presigned URLs reused within their life."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest

from bus import Bus, BusOptions, connect_bus
from ingress.live import JobState, LiveEvents, LiveProgress
from ingress.presigned import PresignedUrls
from projector.database import Database, create_database, create_schema
from projector.readside import JobRecord, ReadModel
from projector.service import Projector
from schemas import (
    Event,
    GenerationParams,
    ImageStored,
    JobCanceled,
    JobProgress,
    JobQueued,
    JobRequeued,
    JobStarted,
    JobStatus,
    JobSucceeded,
    new_id,
)
from storage.object_store import ObjectStore, S3Config

TIMEOUT_S = 10.0
PARAMS = GenerationParams(prompt="p", model="tiny-sd", width=64, height=64, num_inference_steps=8, guidance_scale=7)


def queued(at: datetime) -> JobQueued:
    return JobQueued(job_id=new_id(), owner="o", backend="diffusers", params=PARAMS, occurred_at=at)


def record(status: JobStatus, *, attempt: int = 1, job_id: str = "j1") -> JobRecord:
    now = datetime.now(UTC)
    return JobRecord(
        id=job_id,
        owner="o",
        status=status,
        backend="diffusers",
        dialect="native",
        params=PARAMS,
        created_at=now,
        started_at=now,
        completed_at=None,
        updated_at=now,
        step=0,
        total_steps=8,
        attempt=attempt,
        error=None,
        images=(),
    )


def step(n: int, *, attempt: int = 1, job_id: str = "j1") -> JobProgress:
    return JobProgress(job_id=job_id, step=n, total_steps=8, attempt=attempt)


# --- live steps over the read model ---------------------------------------------------------------


def test_a_running_job_shows_its_latest_live_step() -> None:
    progress = LiveProgress()
    for n in (1, 2, 3):
        progress.note(step(n))

    shown = progress.overlay(record(JobStatus.PROCESSING))

    assert (shown.step, shown.total_steps) == (3, 8)
    assert progress.overlay(record(JobStatus.PENDING)).step == 0  # started, as far as the bus knows


def test_steps_of_an_earlier_attempt_are_not_shown_after_a_redelivery() -> None:
    progress = LiveProgress()
    progress.note(step(5, attempt=1))

    assert progress.overlay(record(JobStatus.PROCESSING, attempt=2)).step == 0


def test_a_requeued_job_forgets_its_steps_an_ended_one_keeps_them() -> None:
    progress = LiveProgress()
    for job_id in ("done", "again", "stopped"):
        progress.note(step(4, job_id=job_id))
    progress.note(JobSucceeded(job_id="done", image_ids=[]))
    progress.note(JobRequeued(job_id="again", reason="stalled"))
    progress.note(JobCanceled(job_id="stopped", reason="canceled by request"))

    # The bus runs ahead of the read model: until it shows the end, the job still shows its step.
    assert progress.overlay(record(JobStatus.PROCESSING, job_id="done")).step == 4
    assert progress.overlay(replace(record(JobStatus.COMPLETED, job_id="done"), step=8)).step == 8
    assert progress.overlay(record(JobStatus.PROCESSING, job_id="again")).step == 0
    assert progress.overlay(record(JobStatus.CANCELED, job_id="stopped")).step == 4


def test_live_steps_are_bounded() -> None:
    progress = LiveProgress(max_jobs=3)
    for index in range(10):
        progress.note(step(1, job_id=f"j{index}"))

    assert len(progress) == 3
    assert progress.overlay(record(JobStatus.PROCESSING, job_id="j9")).step == 1
    assert progress.overlay(record(JobStatus.PROCESSING, job_id="j0")).step == 0


# --- one subscription, one timer ------------------------------------------------------------------


@pytest.fixture
async def memory_bus() -> AsyncIterator[Bus]:
    bus = await connect_bus(f"memory://{uuid.uuid4().hex}", BusOptions(namespace="live"))
    yield bus
    await bus.close()


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    database = create_database(database_url)
    await create_schema(database)
    yield database
    await database.dispose()


@pytest.fixture
def read_model(database: Database) -> ReadModel:
    return ReadModel(database)


async def project(database: Database, bus: Bus, *events: Event) -> None:
    """Events into the read model the projector's way."""
    for event in events:
        await bus.publish_event(event)
    await Projector(database, bus).run(idle_timeout_s=0.1)


async def test_one_subscription_feeds_every_stream_of_a_job_and_the_live_steps(
    memory_bus: Bus, read_model: ReadModel
) -> None:
    live = LiveEvents(memory_bus, read_model, LiveProgress())
    async with asyncio.timeout(TIMEOUT_S), live.running():
        with live.watch_job("j1") as first, live.watch_job("j1") as second, live.watch_job("j2") as other:
            sent = step(2)
            await memory_bus.publish_event(sent)

            assert await first.get() == sent
            assert await second.get() == sent
            assert other.empty()
            assert live.progress.overlay(record(JobStatus.PROCESSING)).step == 2


async def test_the_timer_tells_each_stream_its_position_and_an_end(
    memory_bus: Bus, database: Database, read_model: ReadModel
) -> None:
    start = datetime.now(UTC)
    ahead, mine = queued(start), queued(start + timedelta(seconds=1))
    for event in (ahead, mine):
        await read_model.record_queued(event)
    live = LiveEvents(memory_bus, read_model, LiveProgress())
    with live.watch_job(mine.job_id) as inbox:
        await live.refresh()
        await live.refresh()  # nothing changed: nothing more to tell
        assert [inbox.get_nowait() for _ in range(inbox.qsize())] == [JobState(JobStatus.PENDING, 1)]

        await project(database, memory_bus, JobStarted(job_id=ahead.job_id, worker_id="w", attempt=1))
        await live.refresh()
        assert inbox.get_nowait() == JobState(JobStatus.PENDING, 0)

        await project(database, memory_bus, JobCanceled(job_id=mine.job_id, reason="canceled by request"))
        await live.refresh()
        assert inbox.get_nowait() == JobState(JobStatus.CANCELED, None)


async def test_image_streams_get_stored_images_only(memory_bus: Bus, read_model: ReadModel) -> None:
    live = LiveEvents(memory_bus, read_model, LiveProgress())
    stored = ImageStored(
        job_id="j1",
        image_id="i1",
        index=0,
        object_key="k",
        content_type="image/png",
        width=64,
        height=64,
        size_bytes=1,
        expires_at=datetime.now(UTC),
    )
    async with asyncio.timeout(TIMEOUT_S), live.running():
        with live.watch_images() as inbox:
            await memory_bus.publish_event(step(1))
            await memory_bus.publish_event(stored)
            assert await inbox.get() == stored
            assert inbox.empty()


# --- presigned URLs -------------------------------------------------------------------------------


def url_end(url: str) -> datetime:
    query = parse_qs(urlsplit(url).query)
    signed = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    return signed + timedelta(seconds=int(query["X-Amz-Expires"][0]))


def test_a_presigned_url_is_reused_for_a_while_and_never_outlives_its_image() -> None:
    urls = PresignedUrls(ObjectStore(S3Config("127.0.0.1:9", "key", "secret")), reuse=timedelta(seconds=60))
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    expires_at = now + timedelta(minutes=10)

    first = urls.get("a/b.png", expires_at, now)
    again = urls.get("a/b.png", expires_at, now + timedelta(seconds=59))
    later = urls.get("a/b.png", expires_at, now + timedelta(seconds=61))

    assert first is not None and again == first
    assert later is not None and later != first
    assert url_end(first) <= expires_at and url_end(later) <= expires_at
    assert urls.get("a/b.png", expires_at, expires_at) is None
