"""Database.point_read: the same rows and types as SQLAlchemy's own execution, on both databases;
on SQLite a locked database is waited for off the event loop."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import and_, bindparam, inspect, select, text

from projector.database import create_database, create_schema
from projector.queries import Usage, select_usage
from projector.readside import ReadModel
from projector.tables import images, jobs, owner_daily_images, owner_usage
from schemas import JobStatus

NOW = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
JOB = {
    "id": "j1",
    "owner": "alice",
    "status": "completed",
    "backend": "diffusers",
    "dialect": "native",
    "params": {"prompt": "a fox", "loras": [{"id": "x", "weight": 0.5}]},
    "prompt": "a fox",
    "model": "tiny-sd",
    "created_at": NOW,
    "started_at": None,
    "completed_at": NOW + timedelta(seconds=3),
    "updated_at": NOW,
    "step": 4,
    "total_steps": 4,
    "attempt": 1,
    "error": None,
    "last_event_at": NOW,
}


def image(index: int, state: str) -> dict[str, object]:
    return {
        "id": f"i{index}",
        "job_id": "j1",
        "owner": "alice",
        "index": index,
        "object_key": f"images/j1/{index}.png",
        "content_type": "image/png",
        "width": 64,
        "height": 64,
        "size_bytes": 1000,
        "seed": 2**40 + index,
        "created_at": NOW,
        "expires_at": NOW + timedelta(minutes=10),
        "state": state,
    }


JOB_WITH_IMAGES = (
    select(jobs, images)
    .select_from(jobs.outerjoin(images, and_(images.c.job_id == jobs.c.id, images.c.state != "deleted")))
    .where(jobs.c.id == bindparam("job_id"), jobs.c.owner == bindparam("owner"))
    .order_by(images.c["index"])
)


async def test_point_read_matches_sqlalchemy_execution(database_url: str) -> None:
    database = create_database(database_url)
    try:
        await create_schema(database)
        await database.write(lambda conn: conn.execute(jobs.insert(), [JOB]))
        rows = [image(1, "expired"), image(0, "available"), image(2, "deleted")]
        await database.write(lambda conn: conn.execute(images.insert(), rows))
        params = {"job_id": "j1", "owner": "alice"}

        point = await database.point_read(JOB_WITH_IMAGES, params)
        executed = await database.read(lambda conn: conn.execute(JOB_WITH_IMAGES, params).all())

        assert [tuple(row) for row in point] == [tuple(row) for row in executed]
        index = len(jobs.c) + images.c.keys().index("index")
        assert [row[index] for row in point] == [0, 1]  # in order, the deleted one left out
        assert point[0][jobs.c.keys().index("created_at")] == NOW  # an aware UTC datetime again
        assert point[0][jobs.c.keys().index("params")] == JOB["params"]
        assert await database.point_read(JOB_WITH_IMAGES, {"job_id": "j1", "owner": "bob"}) == []
    finally:
        await database.dispose()


async def test_point_read_processes_parameters_as_sqlalchemy_does(database_url: str) -> None:
    """The quota check's usage read binds a date (text on SQLite): the same answer both ways."""
    database = create_database(database_url)
    try:
        await create_schema(database)
        rows = [
            {"owner": "alice", "day": NOW.date() - timedelta(days=days), "images": images}
            for days, images in ((0, 3), (1, 5), (2, 7))
        ]
        await database.write(lambda conn: conn.execute(owner_daily_images.insert(), rows))
        await database.write(lambda conn: conn.execute(owner_usage.insert(), [{"owner": "alice", "active_jobs": 2}]))
        read = ReadModel(database)
        for owner, since, expected in (
            ("alice", NOW.date() - timedelta(days=1), Usage(2, 8)),
            ("alice", NOW.date() + timedelta(days=1), Usage(2, 0)),
            ("bob", NOW.date(), Usage(0, 0)),
        ):
            assert await read.usage(owner, since) == expected
            assert await database.read(functools.partial(select_usage, owner=owner, since=since)) == expected
    finally:
        await database.dispose()


async def test_a_burst_of_first_point_reads_opens_one_connection(tmp_path: Path) -> None:
    """Reads that arrive together before the loop's connection exists share its opening: each
    opening its own once held a pooled connection apiece for good, and a burst of SSE connects
    exhausted the pool (500s after a 30 s wait)."""
    database = create_database(f"sqlite:///{tmp_path / 'readmodel.db'}")
    try:
        await create_schema(database)
        await database.write(lambda conn: conn.execute(jobs.insert(), [JOB]))
        params = {"job_id": "j1", "owner": "alice"}
        burst = asyncio.gather(*(database.point_read(JOB_WITH_IMAGES, params) for _ in range(100)))
        reads = await asyncio.wait_for(burst, 20)  # the pool's own wait is 30 s
        assert all(len(rows) == 1 for rows in reads)
        assert len(database._raw_connections) == 1  # type: ignore[attr-defined]
    finally:
        await database.dispose()


async def test_a_locked_sqlite_database_is_waited_for_off_the_event_loop(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'readmodel.db'}"
    setup = create_database(url)
    await create_schema(setup)
    await setup.write(lambda conn: conn.execute(jobs.insert(), [JOB]))
    await setup.dispose()
    locked, release = threading.Event(), threading.Event()

    def hold_the_database() -> None:
        # An exclusive-locking-mode writer that opened the file first keeps every reader out.
        holder = sqlite3.connect(tmp_path / "readmodel.db", isolation_level=None)
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("UPDATE jobs SET step = 3")
        locked.set()
        release.wait(30)
        holder.execute("COMMIT")
        holder.close()

    database = create_database(url)
    holder = threading.Thread(target=hold_the_database)
    holder.start()
    try:
        await asyncio.to_thread(locked.wait, 30)
        read = asyncio.ensure_future(database.point_read(JOB_WITH_IMAGES, {"job_id": "j1", "owner": "alice"}))
        # The loop is free while the read waits for the lock (else nothing here could let go of it).
        await asyncio.sleep(0.05)
        assert not read.done()
        release.set()
        rows = await asyncio.wait_for(read, 30)
        assert [row[jobs.c.keys().index("step")] for row in rows] == [3]
        assert len(await database.point_read(JOB_WITH_IMAGES, {"job_id": "j1", "owner": "alice"})) == 1
    finally:
        release.set()
        await asyncio.to_thread(holder.join, 30)
        await database.dispose()


async def test_get_job_gives_live_images_by_index_and_only_its_owner(database_url: str) -> None:
    database = create_database(database_url)
    try:
        await create_schema(database)
        job = {**JOB, "params": {"prompt": "a fox", "model": "tiny-sd", "width": 64, "height": 64,
                                 "num_inference_steps": 4, "guidance_scale": 7.0}}  # fmt: skip
        await database.write(lambda conn: conn.execute(jobs.insert(), [job]))
        rows = [image(2, "available"), image(1, "deleted"), image(0, "expired")]  # stored out of order
        await database.write(lambda conn: conn.execute(images.insert(), rows))
        read_model = ReadModel(database)

        record = await read_model.get_job("j1", "alice")
        assert record is not None
        assert [(i.index, i.state.value) for i in record.images] == [(0, "expired"), (2, "available")]
        assert record.params.guidance_scale == 7.0 and record.completed_at == NOW + timedelta(seconds=3)
        assert await read_model.get_job("j1", None) == record  # admin view
        assert await read_model.get_job("j1", "bob") is None
        await database.write(lambda conn: conn.execute(images.delete()))
        assert (await read_model.get_job("j1", "alice")).images == ()  # type: ignore[union-attr]
    finally:
        await database.dispose()


async def test_queue_positions_count_along_the_queue_index_of_any_read_model(database_url: str) -> None:
    """Positions of pending jobs (ties on created_at broken by id), counted along the queue's
    index: a read model created before the index gets it from create_schema."""
    database = create_database(database_url)
    try:
        await create_schema(database)
        await database.write(lambda conn: conn.execute(text("DROP INDEX jobs_queue")))
        await create_schema(database)  # as a new release starting on an old read model

        def job(job_id: str, status: str, backend: str, seconds: int) -> dict[str, object]:
            params = {"prompt": "a fox", "model": "tiny-sd", "width": 64, "height": 64, "num_inference_steps": 4}
            return {
                **JOB,
                "id": job_id,
                "status": status,
                "backend": backend,
                "created_at": NOW + timedelta(seconds=seconds),
                "params": {**params, "guidance_scale": 7.0},
            }

        rows = [
            job("done", "completed", "diffusers", 0),
            job("b", "pending", "diffusers", 1),
            job("a", "pending", "diffusers", 1),
            job("other", "pending", "remote", 0),
            job("c", "pending", "diffusers", 2),
        ]
        await database.write(lambda conn: conn.execute(jobs.insert(), rows))
        read = ReadModel(database)
        positions = {}
        for job_id in ("a", "b", "c", "other"):
            record = await read.get_job(job_id, None)
            assert record is not None
            positions[job_id] = await read.queue_position(record)
        assert positions == {"a": 0, "b": 1, "c": 2, "other": 0}
        assert (await read.stream_states(["a", "b", "c"])) == {
            job_id: (JobStatus.PENDING, position) for job_id, position in positions.items() if job_id != "other"
        }
        names = await database.read(lambda conn: {index["name"] for index in inspect(conn).get_indexes("jobs")})
        assert "jobs_queue" in names
    finally:
        await database.dispose()
