"""Chaos with real processes and real brokers (the short versions; bench/chaos.py is the long run).

- Worker processes SIGKILLed again and again mid-batch: every job completes exactly once, with
  exactly its deterministic images, and nothing is lost.
- The broker crashes or restarts mid-batch (NATS and RabbitMQ, servers of the test's own):
  worker processes, ingress and projector reconnect, every accepted job completes, and a submit
  made during the outage is either accepted or refused with a JSON 503, never a 500 or a hang.
- SIGTERM on every role as a real process: in-flight work finishes or is handed back, the process
  exits 0 within seconds, and nothing half-written remains.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from bus import BusOptions, connect_bus
from imagebus.process import ManagedProcess, free_port
from imagebus.roles import INGRESS_SHUTDOWN_GRACE_S
from ingress.jobs import CANCEL_WAIT_S
from projector.database import create_database, create_schema
from projector.service import apply_events
from projector.tables import images, jobs, projector_positions
from schemas import (
    Event,
    GenerationParams,
    ImageExpired,
    ImageStored,
    JobFailed,
    JobProgress,
    JobQueued,
    JobStarted,
    JobSucceeded,
    image_id_for,
)
from storage.object_store import ObjectStore, S3Config
from tests.chaos_rig import (
    TERMINAL_EVENTS,
    ChaosFigures,
    NatsBroker,
    RabbitNode,
    RunningJobs,
    Submitted,
    WorkerPool,
    audit,
    kill_workers,
    role_env,
    start_role,
    submit,
    wait_until_terminal,
)
from tests.fixtures.database import NewDatabaseUrl
from tests.stack import KEY_ALICE, Stack, auth, running_stack, served
from workers.backends.base import Backend

# Deliveries a job may take before it is given up on: far more than the kills here can cause, so
# any job that does not complete is a bug, not bad luck.
CHAOS_MAX_DELIVERIES = 20
# Short, so the jobs of a killed worker come back quickly (NATS redelivers after the ack wait).
ACK_WAIT_S = 2.0
# Two single-threaded workers on a two-core machine; a SIGTERMed one finishes within 10 s. On the
# CPU everywhere, so jobs last long enough to be interrupted on a machine with a GPU too.
WORKER_SETTINGS = {
    "IMAGEBUS_WORKER_DEVICE": "cpu",
    "IMAGEBUS_WORKER_TORCH_THREADS": "1",
    "IMAGEBUS_WORKER_SHUTDOWN_GRACE_S": "10",
}


def batch(size: int, *, steps: int = 40) -> list[dict[str, Any]]:
    """Jobs of about half a second of CPU each (tiny model, 128 px); every third asks for two images."""
    return [
        {
            "prompt": f"chaos {index}",
            "width": 128,
            "height": 128,
            "num_inference_steps": steps,
            "num_images": 2 if index % 3 == 0 else 1,
            "seed": index,
        }
        for index in range(size)
    ]


@contextlib.asynccontextmanager
async def worker_pool(stack: Stack, bus_url: str, s3: S3Config, log_dir: Path, size: int) -> AsyncIterator[WorkerPool]:
    pool = WorkerPool(role_env(bus_url, stack.options, s3, WORKER_SETTINGS), log_dir, size).start()
    try:
        yield pool
    finally:
        pool.kill_all()


@contextlib.asynccontextmanager
async def following(stack: Stack) -> AsyncIterator[RunningJobs]:
    running = RunningJobs()
    task = asyncio.create_task(running.follow(stack.bus))
    try:
        yield running
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def assert_clean(figures: ChaosFigures, *, exactly_one_terminal_event: bool) -> None:
    print("\n".join(figures.lines()))
    assert figures.problems == []
    assert figures.jobs_lost == 0
    assert figures.jobs_not_completed == 0
    assert figures.duplicates_visible == 0
    if exactly_one_terminal_event:
        assert figures.terminal_events_max == 1, figures
    else:
        # RabbitMQ's stream keeps a second result event (no publish de-duplication); the read model
        # still shows one terminal state, which the checks above hold.
        assert figures.terminal_events_max >= 1


# --- repeated SIGKILL -------------------------------------------------------------------------


@pytest.mark.parametrize("broker", ["nats", "amqp"])
async def test_workers_killed_again_and_again_every_job_completes_once(
    broker: str, request: pytest.FixtureRequest, storage_config: S3Config, tiny_backend: Backend, tmp_path: Path
) -> None:
    bus_url = str(request.getfixturevalue(f"{broker}_url"))
    rng = random.Random()
    started = time.monotonic()
    async with (
        running_stack(
            bus_url,
            storage_config,
            f"sqlite:///{tmp_path}/rm.db",
            tiny_backend,
            workers=0,
            ack_wait_s=ACK_WAIT_S,
            max_deliveries=CHAOS_MAX_DELIVERIES,
        ) as stack,
        worker_pool(stack, bus_url, storage_config, tmp_path, size=2) as pool,
        following(stack) as running,
    ):
        jobs = [await submit(stack.client, auth(), body) for body in batch(12)]
        finished = asyncio.Event()
        killer = asyncio.create_task(kill_workers(pool, running, rng, kills=4, every_s=(1.0, 3.0), until=finished))
        try:
            await wait_until_terminal(
                stack.client, auth(), [job.job_id for job in jobs], timeout_s=150, check=pool.raise_if_any_crashed
            )
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{pool.tails()}") from None
        finally:
            finished.set()
            await killer
        assert pool.died_on_their_own() == [], pool.tails()
        figures = await audit(stack.bus, stack.client, auth(), jobs, ChaosFigures(worker_kills=pool.kills))
        figures.wall_s = time.monotonic() - started
        assert_clean(figures, exactly_one_terminal_event=broker == "nats")
        # Enough chaos happened for the figures to mean something.
        assert pool.kills >= 3, figures
        assert figures.max_deliveries_seen >= 2, figures
        assert set(pool.stop(grace_s=20).values()) == {0}, pool.tails()


# --- broker restarts --------------------------------------------------------------------------


async def submit_during_outage(client: httpx.AsyncClient) -> tuple[int, dict[str, Any], float]:
    """A submit while the broker is down: its status, JSON body and how long it took."""
    began = time.monotonic()
    response = await client.post("/api/generate", json=batch(1)[0], headers=auth())
    assert response.headers["content-type"].startswith("application/json"), response.headers
    return response.status_code, response.json(), time.monotonic() - began


async def restart_mid_batch(stack: Stack, pool: WorkerPool, broker: NatsBroker | RabbitNode, *, crash: bool) -> None:
    """Submit a batch, restart the broker once a few jobs completed, and hold what must hold."""
    jobs = [await submit(stack.client, auth(), body) for body in batch(10)]
    await wait_until_some_completed(stack.client, [job.job_id for job in jobs], count=2, timeout_s=120)
    # The submit during the outage goes to a replica served over real HTTP in this loop: the test
    # client's requests block the loop until answered, and the broker must come back meanwhile.
    async with served(stack.config) as replica:
        await asyncio.to_thread(broker.down, crash=crash)
        outage_submit = asyncio.create_task(submit_during_outage(replica))
        await asyncio.sleep(2.0)
        await asyncio.to_thread(broker.start)
        status, body, seconds = await asyncio.wait_for(outage_submit, 60)
    assert status in (202, 503), (status, body)
    assert seconds < 45, seconds  # never a hang
    if status == 202:
        jobs.append(Submitted(body["job_id"], body["num_images"]))
    else:
        assert body["status"] == "error" and "unavailable" in body["message"], body
    try:
        await wait_until_terminal(
            stack.client, auth(), [job.job_id for job in jobs], timeout_s=150, check=pool.raise_if_any_crashed
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{pool.tails()}") from None
    # The workers reconnected: none of them exited (they would have, had the outage killed them).
    assert pool.died_on_their_own() == [], pool.tails()
    figures = await audit(stack.bus, stack.client, auth(), jobs, ChaosFigures(broker_restarts=1))
    figures.submits_refused = int(status == 503)
    assert_clean(figures, exactly_one_terminal_event=isinstance(broker, NatsBroker))
    # Submits work again after the restart, all the way through.
    again = await submit(stack.client, auth(), batch(1)[0])
    await wait_until_terminal(stack.client, auth(), [again.job_id], timeout_s=60)
    assert set(pool.stop(grace_s=20).values()) == {0}, pool.tails()


async def wait_until_some_completed(
    client: httpx.AsyncClient, job_ids: list[str], *, count: int, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        response = await client.get("/api/jobs", params={"status": "completed", "limit": 50}, headers=auth())
        assert response.status_code == 200, response.text
        if sum(1 for job in response.json()["jobs"] if job["id"] in job_ids) >= count:
            return
        assert time.monotonic() < deadline, f"fewer than {count} jobs completed after {timeout_s:.0f} s"
        await asyncio.sleep(0.2)


async def test_nats_crash_and_restart_mid_batch_loses_nothing(
    storage_config: S3Config, tiny_backend: Backend, tmp_path: Path
) -> None:
    broker = NatsBroker(tmp_path / "nats").start()
    try:
        async with (
            running_stack(
                broker.url,
                storage_config,
                f"sqlite:///{tmp_path}/rm.db",
                tiny_backend,
                workers=0,
                ack_wait_s=ACK_WAIT_S,
                max_deliveries=CHAOS_MAX_DELIVERIES,
            ) as stack,
            worker_pool(stack, broker.url, storage_config, tmp_path, size=2) as pool,
        ):
            # SIGKILL: nothing the server acknowledged may depend on a clean shutdown.
            await restart_mid_batch(stack, pool, broker, crash=True)
    finally:
        broker.close()


async def test_rabbitmq_restart_mid_batch_loses_nothing(
    storage_config: S3Config, tiny_backend: Backend, tmp_path: Path
) -> None:
    node = await asyncio.to_thread(RabbitNode(tmp_path / "rabbit").start)
    try:
        async with (
            running_stack(
                node.url,
                storage_config,
                f"sqlite:///{tmp_path}/rm.db",
                tiny_backend,
                workers=0,
                ack_wait_s=ACK_WAIT_S,
                max_deliveries=CHAOS_MAX_DELIVERIES,
            ) as stack,
            worker_pool(stack, node.url, storage_config, tmp_path, size=2) as pool,
        ):
            await restart_mid_batch(stack, pool, node, crash=False)
    finally:
        await asyncio.to_thread(node.close)


# --- SIGTERM on every role --------------------------------------------------------------------

# A SIGTERMed role must be gone within this long once its in-flight work is done.
PROMPT_EXIT_S = 10.0


def exit_code_within(process: ManagedProcess, seconds: float) -> int | None:
    """The exit code if the process ends within ``seconds``, else None (and it is killed)."""
    assert process.process is not None
    try:
        return process.process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        return None


async def exited_within(process: ManagedProcess, seconds: float) -> int | None:
    return await asyncio.to_thread(exit_code_within, process, seconds)


async def test_sigterm_ingress_answers_the_request_in_flight_then_exits(
    nats_url: str, storage_config: S3Config, tmp_path: Path
) -> None:
    options = BusOptions(namespace=f"t{uuid.uuid4().hex[:10]}")
    port = free_port()
    env = role_env(
        nats_url,
        options,
        storage_config,
        {
            "IMAGEBUS_DATABASE_URL": f"sqlite:///{tmp_path}/rm.db",
            "IMAGEBUS_API_KEYS": KEY_ALICE,
            "IMAGEBUS_INGRESS_PORT": str(port),
        },
    )
    ingress = start_role("ingress", ["ingress"], env, tmp_path)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            await wait_until_answering(client, ingress)
            # No worker runs: the job stays pending, and its cancel waits for an end that does not
            # come (CANCEL_WAIT_S), which makes it a request that is still in flight at the SIGTERM.
            job = await submit(client, auth(), batch(1)[0])
            stream = asyncio.create_task(read_stream(client, f"/api/sse/{job.job_id}"))
            cancel = asyncio.create_task(client.post(f"/api/jobs/{job.job_id}/cancel", headers=auth()))
            await asyncio.sleep(CANCEL_WAIT_S / 3)
            assert not cancel.done()
            ingress.signal(signal.SIGTERM)
            response = await cancel
            assert response.status_code == 200, response.text
            assert response.json()["job_id"] == job.job_id
            # An open event stream holds the exit up no longer than the grace (uvicorn would wait
            # for it forever).
            assert await exited_within(ingress, INGRESS_SHUTDOWN_GRACE_S + PROMPT_EXIT_S) == 0, ingress.tail()
            await asyncio.wait_for(stream, 5)
    finally:
        ingress.kill()


async def wait_until_answering(client: httpx.AsyncClient, process: ManagedProcess, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.TransportError):
            if (await client.get("/health")).status_code == 200:
                return
        assert process.alive(), process.tail()
        assert time.monotonic() < deadline, f"no answer after {timeout_s:.0f} s:\n{process.tail()}"
        await asyncio.sleep(0.2)


async def read_stream(client: httpx.AsyncClient, path: str) -> int:
    """Read a Server-Sent Events stream until the server ends it; the bytes read."""
    received = 0
    with contextlib.suppress(httpx.TransportError):
        async with client.stream("GET", path, headers=auth()) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_bytes():
                received += len(chunk)
    return received


async def test_sigterm_worker_hands_back_or_finishes_its_job_and_exits(
    nats_url: str, storage_config: S3Config, tiny_backend: Backend, tmp_path: Path
) -> None:
    # About three seconds of work: long enough to be interrupted, short enough to finish in a grace.
    long_job = {"prompt": "slow", "width": 256, "height": 256, "num_inference_steps": 50, "num_images": 1}
    async with running_stack(
        nats_url, storage_config, f"sqlite:///{tmp_path}/rm.db", tiny_backend, workers=0, ack_wait_s=ACK_WAIT_S
    ) as stack:
        env = role_env(nats_url, stack.options, storage_config, WORKER_SETTINGS)
        hasty = start_role("hasty", ["worker"], worker_env(env, "hasty", grace_s=0.5), tmp_path)
        patient: ManagedProcess | None = None
        try:
            async with stack.bus.watch_events() as live:
                handed_back = await submit(stack.client, auth(), long_job)
                await until_progress(live, handed_back.job_id, "hasty")
                # The patient worker starts only now, so the first job went to the hasty one.
                patient = start_role("patient", ["worker"], worker_env(env, "patient", grace_s=30), tmp_path)
                hasty.signal(signal.SIGTERM)
                # Its grace is shorter than the job: it stops the job between two steps, hands the
                # command back and exits, well before the job would have ended.
                assert await exited_within(hasty, PROMPT_EXIT_S) == 0, hasty.tail()
                await stack.wait_for_status(handed_back.job_id, {"completed", "failed"}, timeout_s=120)

                finished = await submit(stack.client, auth(), long_job)
                await until_progress(live, finished.job_id, "patient")
                patient.signal(signal.SIGTERM)
                # Its grace is longer than the job: it finishes the job, then exits.
                assert await exited_within(patient, 30 + PROMPT_EXIT_S) == 0, patient.tail()
            starts = {}
            for job in (handed_back, finished):
                view = await stack.wait_for_status(job.job_id, {"completed", "failed"}, timeout_s=5)
                assert view["status"] == "completed", view
                assert [image["id"] for image in view["images"]] == [image_id_for(job.job_id, 0)]
                events = await stack.events_for(job.job_id)
                assert sum(isinstance(event, TERMINAL_EVENTS) for event in events) == 1, events
                starts[job.job_id] = [(e.worker_id, e.attempt) for e in events if isinstance(e, JobStarted)]
            assert starts[handed_back.job_id] == [("hasty", 1), ("patient", 2)]
            assert starts[finished.job_id] == [("patient", 1)]
        finally:
            hasty.kill()
            if patient is not None:
                patient.kill()


def worker_env(env: dict[str, str], worker_id: str, *, grace_s: float) -> dict[str, str]:
    return {**env, "IMAGEBUS_WORKER_WORKER_ID": worker_id, "IMAGEBUS_WORKER_SHUTDOWN_GRACE_S": str(grace_s)}


async def until_progress(live: AsyncIterator[Event], job_id: str, worker_id: str, timeout_s: float = 90) -> None:
    """Wait until ``worker_id`` started ``job_id`` and made a step of progress on it."""
    started = False
    async with asyncio.timeout(timeout_s):
        async for event in live:
            if event.job_id != job_id:
                continue
            if isinstance(event, JobStarted):
                assert event.worker_id == worker_id, event
                started = True
            elif isinstance(event, JobProgress) and started and event.step >= 2:
                return


async def test_sigterm_projector_leaves_rows_that_equal_a_replay(
    nats_url: str, new_database_url: NewDatabaseUrl, tmp_path: Path
) -> None:
    options = BusOptions(namespace=f"t{uuid.uuid4().hex[:10]}")
    bus = await connect_bus(nats_url, options)
    try:
        logged = [event for index in range(150) for event in finished_job_events(index)]
        for event in logged:
            await bus.publish_event(event)
        database_url = await new_database_url()
        env = role_env(
            nats_url,
            options,
            S3Config("unused:9000", "unused", "unused"),
            # Small batches: many transactions for the SIGTERM to land between (or in).
            {"IMAGEBUS_DATABASE_URL": database_url, "IMAGEBUS_PROJECTOR_BATCH_SIZE": "5"},
        )
        projector = start_role("projector", ["projector"], env, tmp_path)
        try:
            await until_position(database_url, lambda position: position > 0, projector)
            projector.signal(signal.SIGTERM)
            assert await exited_within(projector, PROMPT_EXIT_S) == 0, projector.tail()
            stopped_at = await read_position(database_url)
            # What it wrote is exactly the log up to its position: no batch half applied.
            assert await table_rows(database_url) == await replayed_rows(new_database_url, logged[:stopped_at])

            projector = start_role("projector-2", ["projector"], env, tmp_path)
            await until_position(database_url, lambda position: position == len(logged), projector)
            projector.signal(signal.SIGTERM)
            assert await exited_within(projector, PROMPT_EXIT_S) == 0, projector.tail()
        finally:
            projector.kill()
        assert await table_rows(database_url) == await replayed_rows(new_database_url, logged)
        print(f"\nprojector SIGTERMed at position {stopped_at} of {len(logged)}")
    finally:
        await bus.close()


def finished_job_events(index: int) -> list[Event]:
    job_id = uuid.uuid4().hex
    params = GenerationParams(
        prompt=f"p{index}", model="tiny-sd", width=64, height=64, num_inference_steps=3, guidance_scale=7
    )
    expires_at = datetime.now(UTC) + timedelta(minutes=10)
    events: list[Event] = [
        JobQueued(job_id=job_id, owner="o", backend="diffusers", params=params),
        JobStarted(job_id=job_id, worker_id="w", attempt=1),
        ImageStored(
            job_id=job_id,
            image_id=image_id_for(job_id, 0),
            index=0,
            object_key=f"k/{job_id}/0",
            content_type="image/png",
            width=64,
            height=64,
            size_bytes=10,
            seed=index,
            expires_at=expires_at,
        ),
    ]
    if index % 4 == 0:
        events.append(JobFailed(job_id=job_id, error="boom"))
    else:
        events.append(JobSucceeded(job_id=job_id, image_ids=[image_id_for(job_id, 0)]))
    return events


async def until_position(
    database_url: str, reached: Callable[[int], bool], process: ManagedProcess, timeout_s: float = 60
) -> None:
    deadline = time.monotonic() + timeout_s
    while not reached(await read_position(database_url)):
        assert process.alive(), process.tail()
        assert time.monotonic() < deadline, process.tail()
        await asyncio.sleep(0.005)


async def read_position(url: str) -> int:
    database = create_database(url)
    try:
        value = await database.read(lambda conn: conn.scalar(sa.select(projector_positions.c.position)))
        return int(value or 0)
    except sa.exc.DBAPIError:
        return 0  # its tables are not there yet
    finally:
        await database.dispose()


async def table_rows(url: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    def select(conn: sa.Connection) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        job_rows = conn.execute(sa.select(jobs).order_by(jobs.c.id)).mappings().all()
        image_rows = conn.execute(sa.select(images).order_by(images.c.id)).mappings().all()
        return [dict(row) for row in job_rows], [dict(row) for row in image_rows]

    database = create_database(url)
    try:
        return await database.read(select)
    finally:
        await database.dispose()


async def replayed_rows(
    new_database_url: NewDatabaseUrl, events: list[Event]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows a fresh read model gets from ``events``, applied by the projector's own code."""
    url = await new_database_url()
    database = create_database(url)
    try:
        await create_schema(database)
        await database.write(lambda conn: apply_events(conn, events))
    finally:
        await database.dispose()
    return await table_rows(url)


async def test_sigterm_reaper_exits_after_announcing_every_image_it_deleted(
    nats_url: str, object_store: ObjectStore, storage_config: S3Config, tmp_path: Path
) -> None:
    expired_at = datetime.now(UTC) - timedelta(minutes=1)
    keys = []
    for _ in range(40):
        job_id = uuid.uuid4().hex
        key = ObjectStore.image_key(job_id, image_id_for(job_id, 0), expired_at, "image/png")
        await object_store.put_stream(key, io.BytesIO(b"png"), content_type="image/png", length=3)
        keys.append(key)
    options = BusOptions(namespace=f"t{uuid.uuid4().hex[:10]}")
    bus = await connect_bus(nats_url, options)
    env = role_env(nats_url, options, storage_config, {"IMAGEBUS_REAPER_INTERVAL_S": "0.5"})
    try:
        async with bus.watch_events() as live:
            reaper = start_role("reaper", ["reaper"], env, tmp_path)
            try:
                async with asyncio.timeout(60):
                    async for event in live:
                        if isinstance(event, ImageExpired):
                            break  # it is reaping: stop it now
                reaper.signal(signal.SIGTERM)
                assert await exited_within(reaper, PROMPT_EXIT_S) == 0, reaper.tail()
            finally:
                reaper.kill()
        async with bus.read_events(idle_timeout_s=0.5) as events:
            announced = {logged.event.object_key async for logged in events if isinstance(logged.event, ImageExpired)}
        remaining = {obj.key for obj in await object_store.list_expired(datetime.now(UTC), limit=1000)}
        # Announce first, then delete: whatever is gone was announced (what remains, the next run reaps).
        assert set(keys) - remaining <= announced
        assert announced, "the reaper announced nothing"
    finally:
        await bus.close()
