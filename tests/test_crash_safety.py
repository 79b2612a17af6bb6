"""Real processes killed with SIGKILL: a worker mid-job, the projector at random points."""

from __future__ import annotations

import asyncio
import random
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bus import BusOptions, connect_bus
from imagebus.process import ManagedProcess
from projector.database import create_database, create_schema
from projector.tables import images, jobs, projector_positions
from schemas import (
    GenerationParams,
    ImageStored,
    JobFailed,
    JobProgress,
    JobQueued,
    JobStarted,
    JobSucceeded,
    image_id_for,
)
from storage.object_store import S3Config
from tests.chaos_rig import role_env, start_role
from tests.fixtures.database import NewDatabaseUrl
from tests.stack import auth, running_stack
from workers.backends.base import Backend


@pytest.mark.parametrize("broker", ["nats", "amqp"])
async def test_worker_killed_mid_job_is_redelivered_and_completes_once(
    broker: str, request: pytest.FixtureRequest, storage_config: S3Config, tiny_backend: Backend, tmp_path: Path
) -> None:
    bus_url = str(request.getfixturevalue(f"{broker}_url"))
    # The in-process stack runs no worker here: the workers are real processes we can kill.
    async with running_stack(
        bus_url, storage_config, f"sqlite:///{tmp_path}/rm.db", tiny_backend, workers=0, ack_wait_s=2.0
    ) as stack:
        env = role_env(bus_url, stack.options, storage_config)
        first = start_role("worker-1", ["worker"], {**env, "IMAGEBUS_WORKER_WORKER_ID": "w1"}, tmp_path)
        second: ManagedProcess | None = None
        try:
            body = {
                "prompt": "slow fox",
                "width": 128,
                "height": 128,
                "num_inference_steps": 40,
                "num_images": 2,
            }
            async with stack.bus.watch_events() as live:
                job_id = (await stack.client.post("/api/generate", json=body, headers=auth())).json()["job_id"]
                async with asyncio.timeout(120):
                    async for event in live:
                        if isinstance(event, JobProgress) and event.job_id == job_id and event.step >= 3:
                            break
            first.kill()  # SIGKILL mid-job: no ack, no terminal event
            second = start_role("worker-2", ["worker"], {**env, "IMAGEBUS_WORKER_WORKER_ID": "w2"}, tmp_path)
            job = await stack.wait_for_status(job_id, {"completed", "failed"}, timeout_s=180)
            assert job["status"] == "completed", (job, second.tail())
            assert len(job["images"]) == 2
            assert {img["id"] for img in job["images"]} == {image_id_for(job_id, i) for i in range(2)}

            events = await stack.events_for(job_id)
            terminal = [e for e in events if isinstance(e, JobSucceeded | JobFailed)]
            assert len(terminal) == 1
            starts = [(e.worker_id, e.attempt) for e in events if isinstance(e, JobStarted)]
            assert starts[0] == ("w1", 1)
            assert starts[-1] == ("w2", 2)
        finally:
            first.kill()
            if second is not None:
                second.stop(grace_s=20)


def _job_events(rng: random.Random) -> list[Any]:
    job_id = uuid.uuid4().hex
    params = GenerationParams(
        prompt=f"p{rng.random()}",
        model="tiny-sd",
        width=64,
        height=64,
        num_inference_steps=3,
        guidance_scale=7,
    )
    events: list[Any] = [
        JobQueued(job_id=job_id, owner="o", backend="diffusers", params=params),
        JobStarted(job_id=job_id, worker_id="w", attempt=1),
    ]
    if rng.random() < 0.3:
        events.append(JobFailed(job_id=job_id, error="boom"))
        return events
    for index in range(2):
        events.append(
            ImageStored(
                job_id=job_id,
                image_id=image_id_for(job_id, index),
                index=index,
                object_key=f"k/{job_id}/{index}",
                content_type="image/png",
                width=64,
                height=64,
                size_bytes=10,
                seed=index,
                expires_at=events[0].occurred_at,
            )
        )
    events.append(JobSucceeded(job_id=job_id, image_ids=[image_id_for(job_id, i) for i in range(2)]))
    return events


def _select_rows(conn: sa.Connection) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    job_rows = conn.execute(sa.select(jobs).order_by(jobs.c.id)).mappings().all()
    image_rows = conn.execute(sa.select(images).order_by(images.c.id)).mappings().all()
    return [dict(r) for r in job_rows], [dict(r) for r in image_rows]


async def _table_rows(url: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    database = create_database(url)
    try:
        return await database.read(_select_rows)
    finally:
        await database.dispose()


async def _position(url: str) -> int:
    database = create_database(url)
    try:
        value = await database.read(lambda conn: conn.scalar(sa.select(projector_positions.c.position)))
        return int(value or 0)
    finally:
        await database.dispose()


async def test_projector_killed_at_random_points_equals_rebuild(
    nats_url: str, new_database_url: NewDatabaseUrl, tmp_path: Path
) -> None:
    database_url = await new_database_url()
    database = create_database(database_url)
    await create_schema(database)
    await database.dispose()
    rng = random.Random(7)
    options = BusOptions(namespace=f"t{uuid.uuid4().hex[:10]}")
    bus = await connect_bus(nats_url, options)
    env = {
        "IMAGEBUS_BUS_URL": nats_url,
        "IMAGEBUS_BUS_NAMESPACE": options.namespace,
        "IMAGEBUS_DATABASE_URL": database_url,
        # Small batches: more transactions, more places for a kill to land.
        "IMAGEBUS_PROJECTOR_BATCH_SIZE": "7",
    }
    # Enough that a loaded machine's slow polling still lands several kills midway.
    all_events = [event for _ in range(400) for event in _job_events(rng)]
    for event in all_events:
        await bus.publish_event(event)
    last_position = len(all_events)

    started: list[ManagedProcess] = []

    def start_projector() -> ManagedProcess:
        started.append(start_role("projector", ["projector"], env, tmp_path))
        return started[-1]

    kills_midway = 0
    projector = start_projector()
    try:
        seen = 0
        while kills_midway < 5:
            # Kill it at a random moment once it is applying, i.e. after its position moved.
            for _ in range(600):
                if await _position(database_url) > seen:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(rng.uniform(0.0, 0.05))
            projector.kill()
            seen = await _position(database_url)
            if seen >= last_position:
                break
            kills_midway += 1
            projector = start_projector()
        assert kills_midway >= 3, "the projector finished before it could be killed midway; add events"
        if not projector.alive():
            projector = start_projector()
        for _ in range(600):
            if await _position(database_url) >= last_position:
                break
            await asyncio.sleep(0.05)
        live = await _table_rows(database_url)
    finally:
        for process in started:
            process.stop(grace_s=5)

    # The comparison is built the way an operator would: `imagebus projector --rebuild`.
    fresh_url = await new_database_url()  # same kind of database as the live one
    rebuilder = start_role("rebuild", ["projector", "--rebuild"], {**env, "IMAGEBUS_DATABASE_URL": fresh_url}, tmp_path)
    try:
        for _ in range(600):
            if await _position_or_zero(fresh_url) >= last_position:
                break
            await asyncio.sleep(0.05)
    finally:
        assert rebuilder.stop() == 0, rebuilder.tail()
    await bus.close()
    assert len(live[0]) == len({event.job_id for event in all_events})
    assert live == await _table_rows(fresh_url)


async def _position_or_zero(url: str) -> int:
    """The projector's position, or 0 while its tables do not exist yet."""
    try:
        return await _position(url)
    except sa.exc.DBAPIError:
        return 0
