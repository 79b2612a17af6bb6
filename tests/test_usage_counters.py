"""Per-owner usage counters: the quota check reads them instead of scanning the owner's jobs.

The reference is the scan the quota check used to run over the jobs rows (``scanned_usage``):
whatever the batching, redelivery, replay, rebuild or race between the ingress's read-your-writes
insert and the projector, the counters must answer what that scan answers.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, func, select

from bus import Bus
from projector.apply import JobRow
from projector.database import Database, create_database, create_schema
from projector.queries import Usage, select_usage
from projector.readside import ReadModel
from projector.service import Projector, apply_events, rebuild
from projector.tables import jobs, metadata, owner_daily_images, owner_usage
from projector.usage import write_jobs
from schemas import Event, JobQueued, JobStatus
from tests.fixtures.database import NewDatabaseUrl
from tests.test_projector import (
    IDLE_S,
    T0,
    canceled,
    failed,
    fold,
    job_story,
    new_bus,
    publish,
    queued,
    started,
    succeeded,
)

OWNERS = ("alice", "bob")
DAY_S = 86_400


def history(rng: random.Random, count: int, *, unfinished: int = 3) -> list[Event]:
    """Jobs spread over four UTC days, interleaved by time; the last ``unfinished`` never end."""
    events: list[Event] = []
    for k in range(count):
        story = job_story(rng, f"job{k:03d}", start=rng.uniform(0, 3 * DAY_S))
        if k >= count - unfinished:
            story = story[: rng.randint(1, 2)]  # queued, maybe started: still active
        events += story
    return sorted(events, key=lambda e: e.occurred_at)


def redelivered(rng: random.Random, events: list[Event]) -> list[Event]:
    """The log as an at-least-once bus delivers it: some events again, later on."""
    out = list(events)
    for event in rng.sample(events, len(events) // 3):
        out.insert(rng.randint(out.index(event) + 1, len(out)), event)
    return out


def days() -> list[date]:
    return [(T0 + timedelta(days=d)).date() for d in range(-1, 5)]


def scanned_usage(conn: Connection, owner: str, since: date) -> Usage:
    """What the quota check computed before the counters: a scan of the owner's jobs."""
    active = conn.execute(
        select(func.count())
        .select_from(jobs)
        .where(jobs.c.owner == owner, jobs.c.status.in_([JobStatus.PENDING.value, JobStatus.PROCESSING.value]))
    ).scalar_one()
    midnight = datetime(since.year, since.month, since.day, tzinfo=UTC)
    asked = conn.execute(
        select(func.coalesce(func.sum(jobs.c.params["num_images"].as_integer()), 0)).where(
            jobs.c.owner == owner, jobs.c.created_at >= midnight
        )
    ).scalar_one()
    return Usage(int(active), int(asked))


def counted_rows(conn: Connection) -> dict[str, Any]:
    """The counters' contents, zeros left out (a finished owner keeps a row at 0)."""
    active = {row.owner: row.active_jobs for row in conn.execute(select(owner_usage)) if row.active_jobs}
    daily = {(row.owner, row.day): row.images for row in conn.execute(select(owner_daily_images)) if row.images}
    return {"active": active, "daily": daily}


def rows_counted_by_hand(conn: Connection) -> dict[str, Any]:
    rows = [JobRow.from_columns(row) for row in conn.execute(select(jobs)).mappings()]
    active = Counter(row.owner for row in rows if not row.status.is_terminal())
    daily: Counter[tuple[str, date]] = Counter()
    for row in rows:
        daily[row.owner, row.created_at.astimezone(UTC).date()] += row.params["num_images"]
    return {"active": dict(active), "daily": dict(daily)}


async def usage_table(database: Database) -> dict[tuple[str, date], tuple[Usage, Usage]]:
    """For every owner and day: what the counters answer, and what the scan answers."""

    def read(conn: Connection) -> dict[tuple[str, date], tuple[Usage, Usage]]:
        return {
            (owner, day): (select_usage(conn, owner, day), scanned_usage(conn, owner, day))
            for owner in (*OWNERS, "nobody")
            for day in days()
        }

    return await database.read(read)


async def assert_counters_match_the_rows(database: Database) -> dict[tuple[str, date], Usage]:
    """The counters equal a count over the rows and the old scan; returns the quota inputs."""
    counted, by_hand = await database.read(lambda conn: (counted_rows(conn), rows_counted_by_hand(conn)))
    assert counted == by_hand
    answers = await usage_table(database)
    for key, (from_counters, from_scan) in answers.items():
        assert from_counters == from_scan, key
    return {key: from_counters for key, (from_counters, _) in answers.items()}


async def apply_in_batches(database: Database, rng: random.Random, events: list[Event]) -> None:
    cut = 0
    while cut < len(events):
        size = rng.choice([1, 2, 7, 30])
        await database.write(functools.partial(apply_events, events=events[cut : cut + size]))
        cut += size


# --- the counters on each database ----------------------------------------------------------------


async def test_counters_equal_the_scan_under_redelivery_and_replay(database: Database) -> None:
    rng = random.Random(3)
    log = history(rng, 30)
    await apply_in_batches(database, rng, redelivered(rng, log))
    usage = await assert_counters_match_the_rows(database)
    assert any(u.active_jobs for u in usage.values()) and any(u.images_since for u in usage.values())

    # The whole log again, in other batches, and its terminal events once more: nothing moves.
    await apply_in_batches(database, rng, log)
    terminal = [e for e in log if e.type in ("JobSucceeded", "JobFailed", "JobCanceled")]
    await database.write(lambda conn: apply_events(conn, terminal))
    assert await assert_counters_match_the_rows(database) == usage


async def test_a_job_counts_once_and_leaves_the_active_count_once(database: Database) -> None:
    read = ReadModel(database)
    today = T0.date()
    first = queued("j1", n=3)
    # The ingress's read-your-writes insert, then the projector's JobQueued (twice), then a start.
    await read.record_queued(first)
    await database.write(lambda conn: apply_events(conn, [first, first, started("j1")]))
    await read.record_queued(first)
    assert await read.usage("alice", today) == Usage(active_jobs=1, images_since=3)
    # The projector first this time, then the ingress.
    second = queued("j2", n=2, t=5)
    await database.write(lambda conn: apply_events(conn, [second]))
    await read.record_queued(second)
    assert await read.usage("alice", today) == Usage(active_jobs=2, images_since=5)
    # Each terminal event of a job, the same one redelivered and then another: one job ended.
    await database.write(lambda conn: apply_events(conn, [succeeded("j1", t=9), succeeded("j1", t=9)]))
    await database.write(lambda conn: apply_events(conn, [failed("j1", t=10), canceled("j2", t=11)]))
    await database.write(lambda conn: apply_events(conn, [canceled("j2", t=11), failed("j2", t=12)]))
    assert await read.usage("alice", today) == Usage(active_jobs=0, images_since=5)
    # Images count on the UTC day the job was created, not the day it is looked at.
    assert await read.usage("alice", today + timedelta(days=1)) == Usage(active_jobs=0, images_since=0)
    assert await read.usage("bob", today) == Usage(active_jobs=0, images_since=0)
    await assert_counters_match_the_rows(database)


async def test_a_pending_row_the_ingress_wrote_since_the_projector_read_counts_once(database: Database) -> None:
    """The race PostgreSQL allows: the projector read no row for the job, then the ingress's
    insert committed before the projector's own (insert-if-absent waits for it, then skips)."""
    event = queued("j1", n=2)
    await ReadModel(database).record_queued(event)
    finished = fold([event, started("j1"), succeeded("j1")]).jobs["j1"]
    await database.write(lambda conn: write_jobs(conn, {}, [finished]))
    assert await ReadModel(database).usage("alice", T0.date()) == Usage(active_jobs=0, images_since=2)
    await assert_counters_match_the_rows(database)


async def test_quota_answers_are_the_same_after_a_rebuild(
    database: Database, database_url: str, new_database_url: NewDatabaseUrl
) -> None:
    """Live (the ingress's inserts racing the projector), then rebuilt from the log: same answers."""
    rng = random.Random(9)
    bus = await new_bus()
    log = redelivered(rng, history(rng, 25))
    await live_with_ingress_inserts(database, database_url, bus, log)
    live = await assert_counters_match_the_rows(database)

    fresh = create_database(await new_database_url())
    try:
        await rebuild(fresh, bus, idle_timeout_s=IDLE_S)
        assert await assert_counters_match_the_rows(fresh) == live
    finally:
        await fresh.dispose()
    # A rebuild in place (imagebus projector --rebuild) drops the counters and counts again.
    await rebuild(database, bus, idle_timeout_s=IDLE_S)
    assert await assert_counters_match_the_rows(database) == live


async def live_with_ingress_inserts(database: Database, database_url: str, bus: Bus, log: list[Event]) -> None:
    """A running projector, and an ingress (a database handle of its own, as another process has)
    writing each job's pending row right after publishing its JobQueued."""
    ingress = create_database(database_url)
    stop = asyncio.Event()
    task = asyncio.create_task(Projector(database, bus, batch_size=5).run(stop=stop))
    try:
        read = ReadModel(ingress)
        for event in log:
            await publish(bus, [event])
            if isinstance(event, JobQueued):
                await read.record_queued(event)
    finally:
        stop.set()
        await task
        await ingress.dispose()
    # Whatever it had not reached when stopped.
    await Projector(database, bus).run(idle_timeout_s=IDLE_S)


async def test_an_existing_read_model_is_counted_when_the_counters_are_added(database: Database) -> None:
    rng = random.Random(4)
    await apply_in_batches(database, rng, history(rng, 12))
    expected = await assert_counters_match_the_rows(database)

    def drop_counters(conn: Connection) -> None:
        metadata.drop_all(conn, tables=[owner_usage, owner_daily_images])

    await database.write(drop_counters)
    await create_schema(database)
    assert await assert_counters_match_the_rows(database) == expected
    # And only then: a second start does not count the jobs again.
    await create_schema(database)
    assert await assert_counters_match_the_rows(database) == expected
