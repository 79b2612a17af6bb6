"""The projector: apply rules (pure), the read model on SQLite and PostgreSQL, and runs over a bus.

The reference for every database check is ``fold``: the pure rules applied in memory. Whatever
the batching, the interruptions or the database, the rows must equal the fold of the events the
stored position says were applied.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import Connection, Engine, select, text

from bus import Bus, connect_bus
from projector.apply import ImageState, Projection, apply_event, queued_row
from projector.arrivals import RecentArrivals
from projector.database import Database, create_database, create_schema, insert_if_absent
from projector.readside import ReadModel
from projector.service import Projector, apply_events, rebuild
from projector.stall_watchdog import fail_stalled
from projector.tables import images, jobs
from schemas import (
    Event,
    GenerationParams,
    ImageDeleted,
    ImageExpired,
    ImageStored,
    JobCanceled,
    JobFailed,
    JobHeartbeat,
    JobProgress,
    JobQueued,
    JobStarted,
    JobStatus,
    JobSucceeded,
    image_id_for,
    terminal_message_id,
)
from tests.fixtures.database import NewDatabaseUrl

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
IDLE_S = 0.05


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# --- events -------------------------------------------------------------------------------------


def queued(job: str = "j1", *, owner: str = "alice", t: float = 0, steps: int = 4, n: int = 1) -> JobQueued:
    params = GenerationParams(
        prompt=f"a lighthouse for {job}",
        model="tiny",
        width=64,
        height=64,
        num_inference_steps=steps,
        guidance_scale=7.5,
        seed=2**40 + 7,
        num_images=n,
    )
    return JobQueued(job_id=job, owner=owner, backend="tiny", params=params, occurred_at=at(t))


def started(job: str = "j1", *, attempt: int = 1, t: float = 1) -> JobStarted:
    return JobStarted(job_id=job, worker_id="w1", attempt=attempt, occurred_at=at(t))


def progress(job: str = "j1", *, step: int, total: int = 4, t: float = 2, attempt: int = 1) -> JobProgress:
    return JobProgress(job_id=job, step=step, total_steps=total, attempt=attempt, occurred_at=at(t))


def stored(job: str = "j1", *, index: int = 0, key: str = "a1", t: float = 3) -> ImageStored:
    return ImageStored(
        job_id=job,
        image_id=image_id_for(job, index),
        index=index,
        object_key=f"{job}/{key}/{index}.png",
        content_type="image/png",
        width=64,
        height=64,
        size_bytes=1234,
        seed=2**40 + 7 + index,
        expires_at=at(t + 600),
        occurred_at=at(t),
    )


def succeeded(job: str = "j1", *, t: float = 4, n: int = 1) -> JobSucceeded:
    return JobSucceeded(job_id=job, image_ids=[image_id_for(job, i) for i in range(n)], occurred_at=at(t))


def failed(job: str = "j1", *, t: float = 4) -> JobFailed:
    return JobFailed(job_id=job, error="out of memory", occurred_at=at(t))


def canceled(job: str = "j1", *, t: float = 4) -> JobCanceled:
    return JobCanceled(job_id=job, reason="canceled by request", occurred_at=at(t))


def expired(job: str = "j1", *, index: int = 0, key: str = "a1", t: float = 603) -> ImageExpired:
    return ImageExpired(
        job_id=job, image_id=image_id_for(job, index), object_key=f"{job}/{key}/{index}.png", occurred_at=at(t)
    )


def deleted(job: str = "j1", *, index: int = 0, t: float = 30) -> ImageDeleted:
    return ImageDeleted(job_id=job, image_id=image_id_for(job, index), occurred_at=at(t))


def job_story(rng: random.Random, job: str, start: float) -> list[Event]:
    """What the log holds for one job: maybe a redelivery, then exactly one outcome, then expiry.
    (Per-step progress is live only: the log never holds it.)"""
    n = rng.choice([1, 2])
    owner = rng.choice(["alice", "bob"])
    t = start
    events: list[Event] = [queued(job, owner=owner, t=t, steps=rng.choice([2, 4]), n=n)]
    attempts = 2 if rng.random() < 0.3 else 1
    outcome = rng.choice(["succeeded", "succeeded", "failed", "canceled"])
    for attempt in range(1, attempts + 1):
        t += rng.uniform(0.1, 1)
        events.append(started(job, attempt=attempt, t=t))
        for index in range(n):
            t += 0.1
            events.append(stored(job, index=index, key=f"a{attempt}", t=t))
    t += 0.1
    outcomes: dict[str, Callable[..., Event]] = {"succeeded": succeeded, "failed": failed, "canceled": canceled}
    events.append(outcomes[outcome](job, t=t))
    if outcome == "succeeded":
        # The reaper expires every object it stored, orphans of the first attempt included.
        events += [expired(job, index=i, key=f"a{a}", t=t + 600) for a in range(1, attempts + 1) for i in range(n)]
    return events


def event_log(rng: random.Random, count: int) -> list[Event]:
    """Several jobs' stories interleaved by time, as concurrent workers publish them."""
    stories = [job_story(rng, f"job{k:03d}", start=rng.uniform(0, 5)) for k in range(count)]
    return sorted((e for story in stories for e in story), key=lambda e: e.occurred_at)


# --- helpers --------------------------------------------------------------------------------------


def fold(events: Sequence[Event], projection: Projection | None = None) -> Projection:
    projection = projection or Projection()
    for event in events:
        apply_event(projection, event)
    return projection


Rows = tuple[list[dict[str, Any]], list[dict[str, Any]]]


def expected_rows(events: Sequence[Event]) -> Rows:
    projection = fold(events)
    return (
        [projection.jobs[key].to_columns() for key in sorted(projection.jobs)],
        [projection.images[key].to_columns() for key in sorted(projection.images)],
    )


def select_rows(conn: Connection) -> Rows:
    job_rows = conn.execute(select(jobs).order_by(jobs.c.id)).mappings().all()
    image_rows = conn.execute(select(images).order_by(images.c.id)).mappings().all()
    return [dict(row) for row in job_rows], [dict(row) for row in image_rows]


async def table_rows(database: Database) -> Rows:
    return await database.read(select_rows)


async def apply_in_transaction(database: Database, events: Sequence[Event]) -> None:
    await database.write(lambda conn: apply_events(conn, events))


async def new_bus() -> Bus:
    return await connect_bus(f"memory://{uuid.uuid4().hex}")


async def publish(bus: Bus, events: Sequence[Event]) -> None:
    for event in events:
        await bus.publish_event(event)


@contextmanager
def position_writes() -> Iterator[list[str]]:
    """The statements that write a projector position, on any engine, while the block runs."""
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "projector_positions" in statement and not statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    sqlalchemy.event.listen(Engine, "before_cursor_execute", seen)
    try:
        yield statements
    finally:
        sqlalchemy.event.remove(Engine, "before_cursor_execute", seen)


# --- apply rules (pure) ---------------------------------------------------------------------------


def test_job_queued_creates_a_pending_job() -> None:
    job = fold([queued(steps=25, t=5)]).jobs["j1"]
    assert job.status is JobStatus.PENDING
    assert (job.owner, job.backend, job.dialect, job.prompt, job.model) == (
        "alice",
        "tiny",
        "native",
        "a lighthouse for j1",
        "tiny",
    )
    assert job.created_at == job.updated_at == job.last_event_at == at(5)
    assert (job.step, job.total_steps, job.attempt) == (0, 25, 0)
    assert (job.started_at, job.completed_at, job.error) == (None, None, None)
    assert GenerationParams.model_validate(job.params) == queued(steps=25).params


def test_a_second_job_queued_changes_nothing() -> None:
    projection = fold([queued(t=0), started(t=1)])
    before = dict(projection.jobs)
    projection.changed_jobs.clear()
    fold([queued(t=0, owner="mallory", steps=99)], projection)
    assert projection.jobs == before
    assert not projection.changed_jobs


def test_job_started_keeps_the_first_start_and_restarts_steps_on_a_new_attempt() -> None:
    projection = fold([queued(), started(attempt=1, t=1), progress(step=3, t=2)])
    assert projection.jobs["j1"].status is JobStatus.PROCESSING
    assert projection.jobs["j1"].step == 3
    fold([started(attempt=2, t=10)], projection)
    job = projection.jobs["j1"]
    assert (job.started_at, job.attempt, job.step) == (at(1), 2, 0)


def test_duplicate_or_stale_job_started_keeps_attempt_and_progress() -> None:
    projection = fold([queued(), started(attempt=2, t=1), progress(step=3, t=2, attempt=2)])
    fold([started(attempt=2, t=1), started(attempt=1, t=0.5)], projection)
    job = projection.jobs["j1"]
    assert (job.attempt, job.step, job.status, job.started_at) == (2, 3, JobStatus.PROCESSING, at(1))


def test_late_progress_from_an_earlier_attempt_is_ignored() -> None:
    projection = fold([queued(), started(attempt=1), progress(step=3), started(attempt=2, t=5)])
    fold([progress(step=2, t=6, attempt=2), progress(step=4, t=6.5, attempt=1)], projection)
    assert projection.jobs["j1"].step == 2


def test_progress_sets_steps_and_moves_a_pending_job_to_processing() -> None:
    job = fold([queued(), progress(step=2, total=8, t=3)]).jobs["j1"]
    assert (job.status, job.step, job.total_steps) == (JobStatus.PROCESSING, 2, 8)


def test_succeeded_completes_at_the_last_step() -> None:
    job = fold([queued(steps=4), started(), progress(step=3), succeeded(t=9)]).jobs["j1"]
    assert (job.status, job.completed_at, job.step, job.total_steps, job.error) == (
        JobStatus.COMPLETED,
        at(9),
        4,
        4,
        None,
    )


@pytest.mark.parametrize(
    ("terminal", "status", "error"),
    [(failed, JobStatus.FAILED, "out of memory"), (canceled, JobStatus.CANCELED, "canceled by request")],
)
def test_failed_and_canceled_record_why(terminal: Any, status: JobStatus, error: str) -> None:
    job = fold([queued(), started(), terminal(t=7)]).jobs["j1"]
    assert (job.status, job.completed_at, job.error) == (status, at(7), error)


@pytest.mark.parametrize("first", [succeeded, failed, canceled])
@pytest.mark.parametrize("second", [succeeded, failed, canceled])
def test_the_first_terminal_event_wins(first: Any, second: Any) -> None:
    winner = fold([queued(), started(), first(t=5)]).jobs["j1"]
    job = fold([queued(), started(), first(t=5), second(t=6)]).jobs["j1"]
    assert (job.status, job.completed_at, job.error, job.step) == (
        winner.status,
        at(5),
        winner.error,
        winner.step,
    )


def test_nothing_reopens_or_changes_a_terminal_job() -> None:
    projection = fold([queued(), started(), progress(step=2), stored(), succeeded(t=5)])
    done, image = projection.jobs["j1"], projection.images[image_id_for("j1", 0)]
    fold([started(attempt=2, t=6), progress(step=1, t=7), stored(key="late", t=8)], projection)
    job = projection.jobs["j1"]
    assert (job.status, job.step, job.attempt, job.completed_at) == (done.status, done.step, done.attempt, at(5))
    assert projection.images == {image.id: image}


def test_image_stored_is_an_upsert_and_the_latest_object_key_wins() -> None:
    projection = fold([queued(), started(attempt=1), stored(key="a1", t=3)])
    image = projection.images[image_id_for("j1", 0)]
    assert (image.state, image.owner, image.created_at, image.seed) == (ImageState.AVAILABLE, "alice", at(3), 2**40 + 7)
    fold([started(attempt=2, t=4), stored(key="a2", t=5)], projection)
    assert len(projection.images) == 1
    image = projection.images[image_id_for("j1", 0)]
    assert (image.object_key, image.created_at, image.expires_at) == ("j1/a2/0.png", at(5), at(605))


def test_an_orphan_expiring_leaves_the_current_image_alone() -> None:
    projection = fold([queued(), started(attempt=1), stored(key="a1"), started(attempt=2, t=4)])
    fold([stored(key="a2", t=5), succeeded(t=6), expired(key="a1", t=603)], projection)
    assert projection.images[image_id_for("j1", 0)].state is ImageState.AVAILABLE
    fold([expired(key="a2", t=605)], projection)
    assert projection.images[image_id_for("j1", 0)].state is ImageState.EXPIRED


def test_a_redelivered_image_stored_does_not_resurrect_an_expired_image() -> None:
    projection = fold([queued(), started(), stored(key="a1"), expired(key="a1")])
    fold([stored(key="a1")], projection)
    assert projection.images[image_id_for("j1", 0)].state is ImageState.EXPIRED


def test_deleted_images_stay_deleted() -> None:
    projection = fold([queued(), started(), stored(), succeeded(), deleted(t=30)])
    assert projection.images[image_id_for("j1", 0)].state is ImageState.DELETED
    fold([expired(t=603)], projection)
    assert projection.images[image_id_for("j1", 0)].state is ImageState.DELETED


def test_events_for_unknown_jobs_or_images_are_ignored() -> None:
    projection = fold([started("ghost"), progress("ghost", step=1), stored("ghost"), succeeded("ghost")])
    assert projection.jobs == {} and projection.images == {}
    projection = fold([queued(), expired(t=5), deleted(index=3, t=6)])
    assert projection.images == {}
    assert projection.jobs["j1"].updated_at == at(6)


def test_updated_at_and_last_event_at_never_move_back() -> None:
    projection = fold([queued(t=0), started(t=5)])
    fold([progress(step=1, t=3)], projection)
    job = projection.jobs["j1"]
    assert (job.updated_at, job.last_event_at, job.step) == (at(5), at(5), 1)


def test_a_naive_timestamp_is_read_as_utc() -> None:
    event = started(t=5).model_copy(update={"occurred_at": at(5).replace(tzinfo=None)})
    job = fold([queued(), event]).jobs["j1"]
    assert job.started_at == at(5)


def test_replaying_a_whole_log_changes_nothing() -> None:
    log = event_log(random.Random(3), 12)
    projection = fold(log)
    before = (dict(projection.jobs), dict(projection.images))
    projection.changed_jobs.clear()
    projection.changed_images.clear()
    fold(log, projection)
    assert (projection.jobs, projection.images) == before
    assert not projection.changed_jobs and not projection.changed_images


# --- the read model on each database ------------------------------------------------------------


async def test_batches_of_any_size_give_the_rows_of_the_fold(database: Database) -> None:
    rng = random.Random(5)
    log = event_log(rng, 10)
    cut = 0
    while cut < len(log):
        size = rng.choice([1, 2, 7, 30])
        await apply_in_transaction(database, log[cut : cut + size])
        cut += size
    assert await table_rows(database) == expected_rows(log)


async def test_reapplying_an_applied_batch_changes_nothing(database: Database) -> None:
    log = event_log(random.Random(8), 8)
    await apply_in_transaction(database, log)
    before = await table_rows(database)
    await apply_in_transaction(database, log)
    await apply_in_transaction(database, log[-10:])
    assert await table_rows(database) == before == expected_rows(log)


async def test_timestamps_round_trip_as_aware_utc(database: Database) -> None:
    plus_two = timezone(timedelta(hours=2))
    event = queued().model_copy(update={"occurred_at": at(0).astimezone(plus_two)})
    await apply_in_transaction(database, [event, stored(t=3)])
    record = await ReadModel(database).get_job("j1", "alice")
    assert record is not None
    for value in (record.created_at, record.updated_at, record.images[0].created_at, record.images[0].expires_at):
        assert value.tzinfo is not None and value.utcoffset() == timedelta(0)
    assert record.created_at == at(0)
    assert record.images[0].expires_at == at(603)


async def test_get_job_returns_the_job_with_its_live_images_in_order(database: Database) -> None:
    events: list[Event] = [queued(n=3), started()]
    events += [stored(index=i, t=3 + (2 - i)) for i in (2, 1, 0)]
    events += [succeeded(n=3, t=9), deleted(index=1, t=20), expired(index=2, t=700)]
    await apply_in_transaction(database, events)
    record = await ReadModel(database).get_job("j1", "alice")
    assert record is not None
    assert (record.status, record.step, record.attempt, record.completed_at) == (JobStatus.COMPLETED, 4, 1, at(9))
    assert record.params == queued(n=3).params
    assert [(image.index, image.state) for image in record.images] == [(0, "available"), (2, "expired")]
    assert record.images[0].seed == 2**40 + 7


async def test_each_owner_sees_only_their_own(database: Database) -> None:
    await apply_in_transaction(
        database, [queued(owner="alice"), started(), stored(), stored(index=1), deleted(index=1)]
    )
    read = ReadModel(database)
    image_id = image_id_for("j1", 0)
    assert await read.get_job("j1", "bob") is None
    assert await read.get_image(image_id, "bob") is None
    assert await read.get_job("nope", None) is None
    alice, admin = await read.get_job("j1", "alice"), await read.get_job("j1", None)
    assert alice is not None and alice == admin
    image = await read.get_image(image_id, "alice")
    assert image is not None and image == await read.get_image(image_id, None) and image.owner == "alice"
    # A deleted image is gone for everyone.
    assert await read.get_image(image_id_for("j1", 1), None) is None


async def test_record_queued_writes_the_projectors_row_once(database: Database) -> None:
    read = ReadModel(database)
    event = queued()
    await read.record_queued(event)
    await read.record_queued(event)
    assert await table_rows(database) == ([queued_row(event).to_columns()], [])
    await apply_in_transaction(database, [event])
    assert await table_rows(database) == expected_rows([event])


async def test_record_queued_after_the_projector_moved_on_changes_nothing(database: Database) -> None:
    events: list[Event] = [queued(), started(), progress(step=2)]
    await apply_in_transaction(database, events)
    await ReadModel(database).record_queued(queued())
    assert await table_rows(database) == expected_rows(events)


async def test_create_schema_is_idempotent(database: Database) -> None:
    await apply_in_transaction(database, [queued()])
    await create_schema(database)
    assert len((await table_rows(database))[0]) == 1


async def test_a_failed_write_leaves_nothing_and_the_next_one_commits(database: Database) -> None:
    def insert_then_fail(conn: Connection) -> None:
        insert_if_absent(conn, jobs, [queued_row(queued("j1")).to_columns()])
        raise RuntimeError("midway")

    with pytest.raises(RuntimeError, match="midway"):
        await database.write(insert_then_fail)
    await ReadModel(database).record_queued(queued("j2"))
    assert [row["id"] for row in (await table_rows(database))[0]] == ["j2"]


async def test_a_cancelled_write_ends_and_leaves_the_database_writable(database: Database, database_url: str) -> None:
    """A write cancelled mid-transaction ends before its caller sees the cancellation, holding no lock."""
    inside = threading.Event()

    def slow_insert(conn: Connection) -> None:
        insert_if_absent(conn, jobs, [queued_row(queued("j1")).to_columns()])
        inside.set()
        # Keep the transaction (and on SQLite the write lock) open, without blocking the event loop.
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_sleep(0.2)"))
        else:
            time.sleep(0.2)

    task = asyncio.create_task(database.write(slow_insert))
    assert await asyncio.to_thread(inside.wait, 5)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done(), "the cancelled caller went on while its transaction was still open"
    with pytest.raises(asyncio.CancelledError):
        await task
    # Another process's writer gets the lock at once (a zombie would hold it for the busy timeout).
    other = create_database(database_url)
    try:
        await asyncio.wait_for(ReadModel(other).record_queued(queued("j2")), timeout=2)
    finally:
        await other.dispose()
    assert [row["id"] for row in (await table_rows(database))[0]] == ["j1", "j2"]


# --- the projector over a bus ---------------------------------------------------------------------


async def test_projector_applies_the_log_and_resumes_after_its_position(database: Database) -> None:
    bus = await new_bus()
    log = event_log(random.Random(1), 10)
    await publish(bus, log[:40])
    projector = Projector(database, bus, batch_size=16)
    assert await projector.run(idle_timeout_s=IDLE_S) == 40
    assert await projector.position() == 40
    assert await table_rows(database) == expected_rows(log[:40])
    assert await projector.run(idle_timeout_s=IDLE_S) == 0
    await publish(bus, log[40:])
    assert await Projector(database, bus).run(idle_timeout_s=IDLE_S) == len(log) - 40
    assert await table_rows(database) == expected_rows(log)


async def test_read_your_writes_then_the_projector_gives_one_row(database: Database) -> None:
    bus = await new_bus()
    read = ReadModel(database)
    event = queued()
    await bus.publish_event(event)
    await read.record_queued(event)
    projector = Projector(database, bus)
    assert await projector.position() is None  # record_queued leaves the stream position alone
    await publish(bus, [started(), progress(step=1)])  # the step is live only: not in the log
    assert await projector.run(idle_timeout_s=IDLE_S) == 2
    assert await table_rows(database) == expected_rows([event, started()])


# 60 s: a batch waits only while events keep coming, so a lone one is written after the short gap.
@pytest.mark.parametrize("batch_wait_s", [0.0, 60.0])
async def test_a_lone_event_is_applied_at_once_and_stop_returns_promptly(
    database: Database, batch_wait_s: float
) -> None:
    bus = await new_bus()
    read = ReadModel(database)
    stop = asyncio.Event()
    task = asyncio.create_task(Projector(database, bus, batch_wait_s=batch_wait_s).run(stop=stop))
    await asyncio.sleep(0.05)
    await bus.publish_event(queued())
    published = time.perf_counter()
    while await read.get_job("j1", None) is None:
        assert time.perf_counter() - published < 2, "a lone event was not applied"
        await asyncio.sleep(0.001)
    stop.set()
    assert await asyncio.wait_for(task, timeout=1) == 1


async def test_events_after_a_quiet_spell_are_not_held_for_company(database: Database) -> None:
    """A job's last events arrive a millisecond apart and then nothing: on a quiet stack they are
    written at once, not held back a gap for company that the recent rate does not promise."""
    bus = await new_bus()
    read = ReadModel(database)
    stop = asyncio.Event()
    # A gap far longer than the whole check: had either event waited for it, the check would fail.
    task = asyncio.create_task(Projector(database, bus, batch_wait_s=5.0, batch_gap_s=1.0).run(stop=stop))
    try:
        await asyncio.sleep(0.05)
        await bus.publish_event(queued())
        await asyncio.sleep(0.001)
        await bus.publish_event(started())
        published = time.perf_counter()
        while (job := await read.get_job("j1", None)) is None or job.status is not JobStatus.PROCESSING:
            assert time.perf_counter() - published < 0.5, "events of a quiet stack waited for company"
            await asyncio.sleep(0.001)
    finally:
        stop.set()
        assert await asyncio.wait_for(task, timeout=2) == 2


async def test_events_trickling_in_share_transactions(database: Database) -> None:
    """A batch waits for more while events keep coming: events published one by one are written
    in a few transactions (counted by the position writes, one per transaction), not one each."""
    bus = await new_bus()
    log = event_log(random.Random(5), 8)
    stop = asyncio.Event()
    with position_writes() as writes:
        # A gap far above the 1 ms between events, so a busy machine's hiccup does not end a batch.
        task = asyncio.create_task(Projector(database, bus, batch_wait_s=1.0, batch_gap_s=0.2).run(stop=stop))
        try:
            for event in log:
                await bus.publish_event(event)
                await asyncio.sleep(0.001)  # each event on its own, as jobs move
            while await Projector(database, bus).position() != len(log):
                assert not task.done(), task
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            assert await task == len(log)
    assert await table_rows(database) == expected_rows(log)
    assert 1 <= len(writes) <= len(log) // 4, (len(writes), len(log))


async def test_an_interrupted_projector_ends_where_a_rebuild_does(
    database: Database, new_database_url: NewDatabaseUrl
) -> None:
    """Stopped or cancelled at random points, its rows always match its position, and in the end a rebuild."""
    rng = random.Random(11)
    bus = await new_bus()
    log = event_log(rng, 25)
    published = 0
    for _ in range(12):
        more = rng.randint(0, 40)
        await publish(bus, log[published : published + more])
        published += more
        projector = Projector(database, bus, batch_size=rng.choice([1, 3, 10, 100]))
        stop = asyncio.Event()
        task = asyncio.create_task(projector.run(stop=stop))
        await asyncio.sleep(rng.uniform(0, 0.03))
        if rng.random() < 0.5:
            task.cancel()
        else:
            stop.set()
        await asyncio.gather(task, return_exceptions=True)
        position = await projector.position() or 0
        assert await table_rows(database) == expected_rows(log[:position])
    await publish(bus, log[published:])
    await Projector(database, bus).run(idle_timeout_s=IDLE_S)

    fresh = create_database(await new_database_url())
    try:
        assert await rebuild(fresh, bus, idle_timeout_s=IDLE_S) == len(log)
        assert await table_rows(database) == await table_rows(fresh) == expected_rows(log)
    finally:
        await fresh.dispose()


async def test_rebuild_replaces_a_damaged_read_model(database: Database) -> None:
    bus = await new_bus()
    log = event_log(random.Random(2), 5)
    await publish(bus, log)
    await Projector(database, bus).run(idle_timeout_s=IDLE_S)

    def damage(conn: Connection) -> None:
        conn.execute(jobs.update().values(status="failed", error="bit rot"))
        conn.execute(images.delete())

    await database.write(damage)
    assert await rebuild(database, bus, idle_timeout_s=IDLE_S) == len(log)
    assert await table_rows(database) == expected_rows(log)


async def test_ingress_and_projector_write_concurrently(database: Database, database_url: str) -> None:
    """Two databases, as two processes would have: read-your-writes inserts race the projector's batches."""
    bus = await new_bus()
    log = event_log(random.Random(4), 30)
    ingress = create_database(database_url)
    stop = asyncio.Event()
    task = asyncio.create_task(Projector(database, bus, batch_size=5).run(stop=stop))
    try:
        read = ReadModel(ingress)
        for event in log:
            await bus.publish_event(event)
            if isinstance(event, JobQueued):
                await read.record_queued(event)
                assert await read.get_job(event.job_id, event.owner) is not None
        while await Projector(database, bus).position() != len(log):
            assert not task.done(), task
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await task
        await ingress.dispose()
    assert await table_rows(database) == expected_rows(log)


# --- heartbeats and the stall watchdog ------------------------------------------------------------


def test_a_heartbeat_only_moves_the_jobs_last_event_time() -> None:
    before = fold([queued(), started(), progress(step=2)]).jobs["j1"]
    beat = JobHeartbeat(job_id="j1", worker_id="w1", attempt=1, occurred_at=at(90))
    after = fold([queued(), started(), progress(step=2), beat]).jobs["j1"]
    assert after.last_event_at == at(90)
    assert replace(after, last_event_at=before.last_event_at, updated_at=before.updated_at) == before


async def _running_job_an_hour_ago(bus: Bus) -> str:
    job = uuid.uuid4().hex
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    await publish(
        bus,
        [
            queued(job).model_copy(update={"occurred_at": hour_ago}),
            started(job).model_copy(update={"occurred_at": hour_ago}),
        ],
    )
    return job


async def test_the_watchdog_judges_silence_by_the_projectors_freshness_not_the_clock(database: Database) -> None:
    bus = await new_bus()
    job = await _running_job_an_hour_ago(bus)
    projector = Projector(database, bus, caught_up_after_s=2.0)
    run = asyncio.create_task(projector.run(stop=(stop := asyncio.Event())))
    try:
        for _ in range(1000):
            if await projector.position() == 2:
                break
            await asyncio.sleep(0.01)
        # Just applied, not yet known to be caught up: the read model is as old as its newest event,
        # and a job quiet for an hour of wall-clock time is not stalled by that measure.
        fresh = projector.fresh_as_of()
        assert fresh is not None and fresh < datetime.now(UTC) - timedelta(minutes=59)
        assert await fail_stalled(bus, ReadModel(database), fresh_as_of=fresh, stall_after_s=60) == []

        await asyncio.sleep(2.5)  # idle on an empty log: caught up, so now is now
        fresh = projector.fresh_as_of()
        assert fresh is not None and fresh > datetime.now(UTC) - timedelta(seconds=5)
        assert await fail_stalled(bus, ReadModel(database), fresh_as_of=fresh, stall_after_s=60) == [job]
        record = await ReadModel(database).get_job(job, "alice")
        while record is None or record.status is not JobStatus.FAILED:
            await asyncio.sleep(0.01)
            record = await ReadModel(database).get_job(job, "alice")
        assert record is not None and record.error == "stalled: no sign of life from its worker for 60 s"
    finally:
        stop.set()
        await run
    async with bus.read_events(idle_timeout_s=0.1) as events:
        terminal = [e.event for e in [x async for x in events] if isinstance(e.event, JobFailed)]
    assert [e.message_id for e in terminal] == [terminal_message_id(job)]


async def test_the_watchdog_spares_a_job_whose_worker_heartbeats(database: Database) -> None:
    bus = await new_bus()
    job = await _running_job_an_hour_ago(bus)
    await bus.publish_event(JobHeartbeat(job_id=job, worker_id="w1", attempt=1))
    await Projector(database, bus).run(idle_timeout_s=IDLE_S)
    assert await fail_stalled(bus, ReadModel(database), fresh_as_of=datetime.now(UTC), stall_after_s=60) == []


def test_recent_arrivals_count_a_burst_and_forget_it_over_the_window() -> None:
    arrivals = RecentArrivals(window_s=0.02)
    for now in (0.0, 0.001, 0.002):
        arrivals.arrived(now)
    assert arrivals.recent(0.002) == pytest.approx(3, rel=0.1)
    assert arrivals.recent(0.1) < 0.03  # five windows later
    assert RecentArrivals(window_s=0.0).recent(0.0) == 0.0
