"""The runtime's concurrency and dynamic batching: several jobs at once, compatible jobs in one call.

A scripted batching backend stands in for the generator (the diffusers backend's own batching is
tested in test_diffusers_backend.py); the bus and the object store are real.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
import uuid
from collections.abc import Hashable
from datetime import UTC, datetime
from typing import Any

import pytest
from PIL import Image

from bus import Bus, BusOptions, connect_bus
from imagebus.roles import worker_options
from imagebus.settings import WorkerSettings
from schemas import (
    CancelJob,
    Event,
    GenerateImage,
    GenerationParams,
    ImageStored,
    JobCanceled,
    JobProgress,
    JobStarted,
    JobSucceeded,
)
from storage.object_store import ObjectStore
from workers.backends.base import GeneratedImage, GenerationCanceled, JobRequest, Progress
from workers.runtime import Worker, WorkerOptions


def _png(color: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(out, format="PNG")
    return out.getvalue()


class BatchingBackend:
    """Steps of ``step_s``; batches jobs of one model; records every call's job ids."""

    name = "batching"

    def __init__(self, *, concurrency: int = 1, max_batch_images: int = 4, steps: int = 5, step_s: float = 0.02):
        self.concurrency = concurrency
        self.max_batch_images = max_batch_images
        self.steps = steps
        self.step_s = step_s
        self.calls: list[list[str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.started = threading.Event()
        self._lock = threading.Lock()

    async def prepare(self, model: str) -> None:
        pass

    async def generate(self, job: JobRequest) -> list[GeneratedImage]:
        result = (await self.generate_batch([job]))[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def batch_key(self, params: GenerationParams) -> Hashable | None:
        return params.model

    async def generate_batch(self, jobs: list[JobRequest]) -> list[list[GeneratedImage] | BaseException]:
        return await asyncio.to_thread(self._run, jobs)

    async def site_quota(self) -> None:
        return None

    async def close(self) -> None:
        pass

    def _run(self, jobs: list[JobRequest]) -> list[list[GeneratedImage] | BaseException]:
        with self._lock:
            self.calls.append([job.job_id for job in jobs])
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.started.set()
        try:
            for step in range(1, self.steps + 1):
                time.sleep(self.step_s)
                if all(job.cancel.canceled for job in jobs):
                    raise GenerationCanceled(jobs[0].cancel.reason)
                for job in jobs:
                    if not job.cancel.canceled:
                        job.on_progress(Progress(step=step, total_steps=self.steps))
        finally:
            with self._lock:
                self.in_flight -= 1
        results: list[list[GeneratedImage] | BaseException] = []
        for job in jobs:
            if job.cancel.canceled:
                results.append(GenerationCanceled(job.cancel.reason))
            else:
                color = "blue" if "blue" in job.params.prompt else "red"
                results.append([GeneratedImage.from_bytes(_png(color), "image/png", 8, 8, seed=i)
                                for i in range(job.params.num_images)])  # fmt: skip
        return results


def _command(prompt: str = "p", model: str = "m", num_images: int = 1) -> GenerateImage:
    job_id = uuid.uuid4().hex
    params = GenerationParams(prompt=prompt, model=model, width=8, height=8, num_inference_steps=5,
                              guidance_scale=1.0, num_images=num_images)  # fmt: skip
    return GenerateImage(job_id=job_id, message_id=job_id, owner="o", backend="batching", params=params)


async def _events(bus: Bus, job_id: str) -> list[Event]:
    async with bus.read_events(idle_timeout_s=0.3) as events:
        return [logged.event async for logged in events if logged.event.job_id == job_id]


@pytest.fixture(params=["memory", "nats"])
async def batch_bus(request: pytest.FixtureRequest) -> Any:
    url = f"memory://{uuid.uuid4().hex}" if request.param == "memory" else request.getfixturevalue("nats_url")
    bus = await connect_bus(url, BusOptions(namespace=f"b{uuid.uuid4().hex[:10]}", ack_wait_s=5.0, max_deliveries=3))
    yield bus
    await bus.close()


def _worker(bus: Bus, store: ObjectStore, backend: BatchingBackend, **options: Any) -> Worker:
    defaults: dict[str, Any] = {"worker_id": "w", "heartbeat_interval_s": 0.3, "batch_linger_s": 0.2}
    return Worker(bus, store, backend, WorkerOptions(**{**defaults, **options}))


async def test_compatible_waiting_jobs_run_as_one_batch_each_with_its_own_events(
    batch_bus: Bus, object_store: ObjectStore
) -> None:
    commands = [_command(prompt=f"job {i}") for i in range(4)]
    for command in commands:
        await batch_bus.publish_command(command)
    backend = BatchingBackend(max_batch_images=4)
    await _worker(batch_bus, object_store, backend).run(idle_timeout_s=0.5)

    assert [sorted(call) for call in backend.calls] == [sorted(c.job_id for c in commands)]
    for command in commands:
        events = await _events(batch_bus, command.job_id)
        kinds = [type(e) for e in events]
        assert kinds == [JobStarted, *[JobProgress] * 5, ImageStored, JobSucceeded], kinds


async def test_batches_respect_the_image_limit_and_the_batch_key(batch_bus: Bus, object_store: ObjectStore) -> None:
    commands = [
        _command(model="a", num_images=2),
        _command(model="b"),
        _command(model="a", num_images=2),
        _command(model="a"),  # would make 5 images with the two above: next batch
        _command(model="b"),
    ]
    for command in commands:
        await batch_bus.publish_command(command)
    backend = BatchingBackend(max_batch_images=4)
    await _worker(batch_bus, object_store, backend).run(idle_timeout_s=0.5)

    ids = [c.job_id for c in commands]
    assert [sorted(call) for call in backend.calls] == [
        sorted([ids[0], ids[2]]),
        sorted([ids[1], ids[4]]),
        [ids[3]],
    ]


async def test_a_canceled_batch_member_leaves_its_batch_mates_images_intact(
    batch_bus: Bus, object_store: ObjectStore
) -> None:
    commands = [_command(prompt="red one"), _command(prompt="blue two"), _command(prompt="red three")]
    for command in commands:
        await batch_bus.publish_command(command)
    backend = BatchingBackend(max_batch_images=4, steps=40, step_s=0.05)
    run = asyncio.create_task(_worker(batch_bus, object_store, backend).run(idle_timeout_s=0.5))
    await asyncio.to_thread(backend.started.wait, 10)
    await asyncio.sleep(0.2)
    canceled = commands[1]
    async with batch_bus.watch_events(canceled.job_id) as live:
        await batch_bus.publish_control(CancelJob(job_id=canceled.job_id, backend="batching", reason="changed my mind"))

        async def canceled_event() -> Event:
            async for event in live:
                if isinstance(event, JobCanceled):
                    return event
            raise AssertionError("no JobCanceled")

        await asyncio.wait_for(canceled_event(), 1.5)
    # Settled at once, while its batch-mates are still running.
    assert backend.in_flight == 1, "the batch should still be running"
    await run

    assert len(backend.calls) == 1 and len(backend.calls[0]) == 3
    events = await _events(batch_bus, canceled.job_id)
    assert [e.reason for e in events if isinstance(e, JobCanceled)] == ["changed my mind"]
    assert not any(isinstance(e, ImageStored | JobSucceeded) for e in events)
    for mate in (commands[0], commands[2]):
        mate_events = await _events(batch_bus, mate.job_id)
        stored = [e for e in mate_events if isinstance(e, ImageStored)]
        assert len(stored) == 1 and sum(isinstance(e, JobSucceeded) for e in mate_events) == 1
        data = b"".join([chunk async for chunk in object_store.get_stream(stored[0].object_key)])
        pixel = Image.open(io.BytesIO(data)).getpixel((0, 0))
        assert pixel == (255, 0, 0)
    # Nothing of the canceled job was stored.
    everything = await object_store.list_expired(datetime(9999, 1, 1, tzinfo=UTC))
    assert [obj.job_id for obj in everything if obj.job_id == canceled.job_id] == []
    assert len({obj.job_id for obj in everything} & {commands[0].job_id, commands[2].job_id}) == 2


async def test_a_job_canceled_while_waiting_for_a_slot_never_starts(batch_bus: Bus, object_store: ObjectStore) -> None:
    running, waiting = _command(model="a"), _command(model="b")
    await batch_bus.publish_command(running)
    await batch_bus.publish_command(waiting)
    backend = BatchingBackend(max_batch_images=4, steps=20, step_s=0.05)
    run = asyncio.create_task(_worker(batch_bus, object_store, backend).run(idle_timeout_s=0.5))
    await asyncio.to_thread(backend.started.wait, 10)
    await asyncio.sleep(0.1)
    await batch_bus.publish_control(CancelJob(job_id=waiting.job_id, backend="batching", reason="no longer needed"))
    await run

    events = await _events(batch_bus, waiting.job_id)
    assert [type(e) for e in events] == [JobCanceled]
    assert any(isinstance(e, JobSucceeded) for e in await _events(batch_bus, running.job_id))


async def test_a_concurrent_backend_gets_up_to_its_concurrency_at_once(
    batch_bus: Bus, object_store: ObjectStore
) -> None:
    commands = [_command(prompt=f"job {i}") for i in range(9)]
    for command in commands:
        await batch_bus.publish_command(command)
    backend = BatchingBackend(concurrency=3, max_batch_images=1, steps=4, step_s=0.05)
    await _worker(batch_bus, object_store, backend).run(idle_timeout_s=0.5)

    assert backend.max_in_flight == 3
    assert sorted(job for call in backend.calls for job in call) == sorted(c.job_id for c in commands)
    for command in commands:
        assert sum(isinstance(e, JobSucceeded) for e in await _events(batch_bus, command.job_id)) == 1


def test_jobs_trickling_in_all_run_under_uvloop(object_store: ObjectStore) -> None:
    """Roles run on uvloop, whose timers fire on a millisecond clock: jobs arriving a few ms apart
    (inside each other's batch linger) must all run, none left waiting without a timer."""
    import uvloop

    async def scenario() -> list[int]:
        bus = await connect_bus(f"memory://{uuid.uuid4().hex}", BusOptions(namespace=f"u{uuid.uuid4().hex[:8]}"))
        backend = BatchingBackend(max_batch_images=4, steps=2, step_s=0.01)
        commands = [_command(prompt=f"job {i}") for i in range(24)]
        try:
            run = asyncio.create_task(_worker(bus, object_store, backend, batch_linger_s=0.03).run(idle_timeout_s=1.0))
            for command in commands:
                await bus.publish_command(command)
                await asyncio.sleep(0.007)
            await asyncio.wait_for(run, 30)
            return [sum(isinstance(e, JobSucceeded) for e in await _events(bus, c.job_id)) for c in commands]
        finally:
            await bus.close()

    for _ in range(3):
        assert uvloop.run(scenario()) == [1] * 24


@pytest.mark.parametrize("linger_s", [0.0, 1.5])
async def test_the_batch_linger_setting_holds_a_lone_job_back_that_long(
    linger_s: float, object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IMAGEBUS_WORKER_BATCH_LINGER_S, through the role's settings: a job on an idle worker waits
    that long for batch-mates (the default trades latency for fuller batches); 0 starts it at once."""
    monkeypatch.setenv("IMAGEBUS_WORKER_BATCH_LINGER_S", str(linger_s))
    options = worker_options(WorkerSettings(worker_id="w"))
    assert options.batch_linger_s == linger_s
    bus = await connect_bus(f"memory://{uuid.uuid4().hex}", BusOptions(namespace=f"b{uuid.uuid4().hex[:10]}"))
    backend = BatchingBackend(max_batch_images=4)
    try:
        await bus.publish_command(_command())
        began = time.monotonic()
        # Not in burst mode: an idle timeout would end the linger too (the worker is leaving).
        stop = asyncio.Event()
        run = asyncio.create_task(Worker(bus, object_store, backend, options).run(stop=stop))
        assert await asyncio.to_thread(backend.started.wait, 10)
        waited = time.monotonic() - began
        stop.set()
        await run
    finally:
        await bus.close()
    # Wide margins either way: the machine may be busy, the linger is never cut short.
    if linger_s:
        assert waited >= linger_s, waited
    else:
        assert waited < 1.0, waited
