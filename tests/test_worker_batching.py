"""The runtime's concurrency and dynamic batching: several jobs at once, compatible jobs in one call.

A scripted batching backend stands in for the generator (the diffusers backend's own batching is
tested in test_diffusers_backend.py); the bus and the object store are real. A lone job on an idle
worker starts at once, so a burst's first job runs alone: tests that need batch-mates hold that
first call until the worker holds the whole burst (no timing involved), and the adaptive linger's
rule is tested on its own with the clock given.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
import uuid
from collections.abc import Callable, Hashable
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from PIL import Image
from PIL.Image import Image as PILImage

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
from tests.bus_events import logged_events, watched_events
from workers.backends.base import (
    BackendImage,
    GeneratedImage,
    GenerationCanceled,
    JobRequest,
    Progress,
    RenderedImage,
)
from workers.encoding import ImageFormat
from workers.linger import BatchLinger
from workers.runtime import Worker, WorkerOptions


def _png(color: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(out, format="PNG")
    return out.getvalue()


class BatchingBackend:
    """Steps of ``step_s``; batches jobs of one model; records every call's job ids."""

    name = "batching"

    def __init__(
        self,
        *,
        concurrency: int = 1,
        max_batch_images: int = 4,
        steps: int = 5,
        step_s: float = 0.02,
        first_call_gate: threading.Event | None = None,
        render: Callable[[JobRequest, int], RenderedImage] | None = None,
        on_call: Callable[[int], None] | None = None,
    ):
        self.concurrency = concurrency
        self.max_batch_images = max_batch_images
        self.steps = steps
        self.step_s = step_s
        # The first call waits for it (at most 30 s) before its steps.
        self.first_call_gate = first_call_gate
        # Images as pixels for the runtime to encode (else PNG bytes), and a hook told each call's number.
        self.render = render
        self.on_call = on_call
        self.calls: list[list[str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.started = threading.Event()
        self._lock = threading.Lock()

    async def prepare(self, model: str) -> None:
        pass

    async def generate(self, job: JobRequest) -> list[BackendImage]:
        result = (await self.generate_batch([job]))[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def batch_key(self, params: GenerationParams) -> Hashable | None:
        return params.model

    async def generate_batch(self, jobs: list[JobRequest]) -> list[list[BackendImage] | BaseException]:
        return await asyncio.to_thread(self._run, jobs)

    async def site_quota(self) -> None:
        return None

    async def close(self) -> None:
        pass

    def _run(self, jobs: list[JobRequest]) -> list[list[BackendImage] | BaseException]:
        with self._lock:
            self.calls.append([job.job_id for job in jobs])
            first = len(self.calls) == 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.started.set()
        if self.on_call is not None:
            self.on_call(len(self.calls))
        if first and self.first_call_gate is not None:
            self.first_call_gate.wait(30)
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
        results: list[list[BackendImage] | BaseException] = []
        for job in jobs:
            if job.cancel.canceled:
                results.append(GenerationCanceled(job.cancel.reason))
            elif self.render is not None:
                results.append([self.render(job, i) for i in range(job.params.num_images)])
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


@pytest.fixture(params=["memory", "nats"])
async def batch_bus(request: pytest.FixtureRequest) -> Any:
    url = f"memory://{uuid.uuid4().hex}" if request.param == "memory" else request.getfixturevalue("nats_url")
    bus = await connect_bus(url, BusOptions(namespace=f"b{uuid.uuid4().hex[:10]}", ack_wait_s=5.0, max_deliveries=3))
    yield bus
    await bus.close()


def _worker(bus: Bus, store: ObjectStore, backend: BatchingBackend, **options: Any) -> Worker:
    defaults: dict[str, Any] = {"worker_id": "w", "heartbeat_interval_s": 0.3, "batch_linger_s": 0.2}
    return Worker(bus, store, backend, WorkerOptions(**{**defaults, **options}))


def _set_on_call(number: int, event: threading.Event) -> Callable[[int], None]:
    """An ``on_call`` hook that sets ``event`` when call ``number`` begins."""

    def hook(call: int) -> None:
        if call == number:
            event.set()

    return hook


async def _run_burst(worker: Worker, gate: threading.Event, burst: int) -> asyncio.Task[int]:
    """Start ``worker`` in burst mode; release its first call once it holds all ``burst`` commands,
    as it would under load (jobs queue while the model is busy)."""
    run = asyncio.create_task(worker.run(idle_timeout_s=0.5))
    async with asyncio.timeout(30):
        while worker.held_jobs < burst:  # noqa: ASYNC110 (a count to watch, no event to wait for)
            await asyncio.sleep(0.01)
    gate.set()
    return run


async def test_compatible_waiting_jobs_run_as_one_batch_each_with_its_own_events(
    batch_bus: Bus, object_store: ObjectStore
) -> None:
    commands = [_command(prompt=f"job {i}") for i in range(5)]
    for command in commands:
        await batch_bus.publish_command(command)
    gate = threading.Event()
    backend = BatchingBackend(max_batch_images=4, first_call_gate=gate)
    async with watched_events(batch_bus) as watched:
        await (await _run_burst(_worker(batch_bus, object_store, backend), gate, len(commands)))

    # The first job started alone at once (the worker was idle); the rest met in one full batch.
    assert [sorted(call) for call in backend.calls] == [[commands[0].job_id], sorted(c.job_id for c in commands[1:])]
    for command in commands:
        events = await logged_events(batch_bus, command.job_id)
        kinds = [type(e) for e in events]
        assert kinds == [JobStarted, ImageStored, JobSucceeded], kinds
        steps = [e.step for e in watched if isinstance(e, JobProgress) and e.job_id == command.job_id]
        assert steps == [1, 2, 3, 4, 5]


async def test_batches_respect_the_image_limit_and_the_batch_key(batch_bus: Bus, object_store: ObjectStore) -> None:
    commands = [
        _command(model="b"),  # alone: the worker is idle when it arrives
        _command(model="a", num_images=2),
        _command(model="b"),
        _command(model="a", num_images=2),
        _command(model="a"),  # would make 5 images with the two above: next batch
        _command(model="b"),
    ]
    for command in commands:
        await batch_bus.publish_command(command)
    gate = threading.Event()
    backend = BatchingBackend(max_batch_images=4, first_call_gate=gate)
    await (await _run_burst(_worker(batch_bus, object_store, backend), gate, len(commands)))

    ids = [c.job_id for c in commands]
    assert [sorted(call) for call in backend.calls] == [
        [ids[0]],
        sorted([ids[1], ids[3]]),
        sorted([ids[2], ids[5]]),
        [ids[4]],
    ]


async def test_a_canceled_batch_member_leaves_its_batch_mates_images_intact(
    batch_bus: Bus, object_store: ObjectStore
) -> None:
    lone = _command(prompt="red zero")
    commands = [_command(prompt="red one"), _command(prompt="blue two"), _command(prompt="red three")]
    for command in (lone, *commands):
        await batch_bus.publish_command(command)
    gate, batch_call = threading.Event(), threading.Event()
    backend = BatchingBackend(
        max_batch_images=4, steps=40, step_s=0.05, first_call_gate=gate, on_call=_set_on_call(2, batch_call)
    )
    run = await _run_burst(_worker(batch_bus, object_store, backend), gate, 4)
    assert await asyncio.to_thread(batch_call.wait, 30)
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

    assert [len(call) for call in backend.calls] == [1, 3]
    events = await logged_events(batch_bus, canceled.job_id)
    assert [e.reason for e in events if isinstance(e, JobCanceled)] == ["changed my mind"]
    assert not any(isinstance(e, ImageStored | JobSucceeded) for e in events)
    for mate in (commands[0], commands[2]):
        mate_events = await logged_events(batch_bus, mate.job_id)
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

    events = await logged_events(batch_bus, waiting.job_id)
    assert [type(e) for e in events] == [JobCanceled]
    assert any(isinstance(e, JobSucceeded) for e in await logged_events(batch_bus, running.job_id))


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
        assert sum(isinstance(e, JobSucceeded) for e in await logged_events(batch_bus, command.job_id)) == 1


def test_jobs_trickling_in_all_run_under_uvloop(object_store: ObjectStore) -> None:
    """Roles run on uvloop, whose timers fire on a millisecond clock: jobs arriving a few ms apart
    (a burst: batches linger for them) must all run, none left waiting without a timer."""
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
            return [sum(isinstance(e, JobSucceeded) for e in await logged_events(bus, c.job_id)) for c in commands]
        finally:
            await bus.close()

    for _ in range(3):
        assert uvloop.run(scenario()) == [1] * 24


async def test_a_lone_job_on_an_idle_worker_starts_at_once_whatever_the_linger(
    object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IMAGEBUS_WORKER_BATCH_LINGER_S bounds how long a batch waits for batch-mates in a burst; a job
    with nothing arriving around it never waits for it (here an hour: the job still starts)."""
    monkeypatch.setenv("IMAGEBUS_WORKER_BATCH_LINGER_S", "3600")
    options = worker_options(WorkerSettings(worker_id="w"))
    assert options.batch_linger_s == 3600
    bus = await connect_bus(f"memory://{uuid.uuid4().hex}", BusOptions(namespace=f"b{uuid.uuid4().hex[:10]}"))
    backend = BatchingBackend(max_batch_images=4)
    try:
        await bus.publish_command(_command())
        # Not in burst mode: an idle timeout would end a linger too (the worker is leaving).
        stop = asyncio.Event()
        run = asyncio.create_task(Worker(bus, object_store, backend, options).run(stop=stop))
        started = await asyncio.to_thread(backend.started.wait, 30)
        stop.set()
        await run
    finally:
        await bus.close()
    assert started, "the lone job waited for batch-mates"


# --- the adaptive linger's rule, on a clock the test holds ------------------------------------


def test_a_delivery_with_none_just_before_it_does_not_linger() -> None:
    linger = BatchLinger(max_linger_s=0.05, burst_gap_s=0.01)
    linger.arrived(100.0)
    assert linger.wait_s(100.0) == 0
    linger.arrived(100.5)  # long after the last one: alone again
    assert linger.wait_s(100.5) == 0


def test_a_burst_lingers_while_deliveries_keep_coming_and_never_past_the_bound() -> None:
    linger = BatchLinger(max_linger_s=0.05, burst_gap_s=0.01)
    linger.arrived(100.000)
    linger.arrived(100.004)  # 4 ms after the first: a burst, the next one is likely near
    assert linger.wait_s(100.004) == pytest.approx(0.010)
    linger.arrived(100.012)  # each arrival extends the wait by the gap...
    assert linger.wait_s(100.012) == pytest.approx(0.010)
    for now in (100.020, 100.028, 100.036, 100.044, 100.052):
        linger.arrived(now)
    # ...but the batch has lingered since 100.004: at most 50 ms in all.
    assert linger.wait_s(100.052) == pytest.approx(0.002)
    assert linger.wait_s(100.054) == 0


def test_a_burst_that_stops_ends_the_linger() -> None:
    linger = BatchLinger(max_linger_s=0.05, burst_gap_s=0.01)
    linger.arrived(100.000)
    linger.arrived(100.003)
    assert linger.wait_s(100.005) == pytest.approx(0.008)
    assert linger.wait_s(100.013) == 0  # no delivery for a whole gap: start with what is there


def test_each_batch_lingers_from_its_own_start() -> None:
    linger = BatchLinger(max_linger_s=0.02, burst_gap_s=0.01)
    now = 100.0
    linger.arrived(now)
    for _ in range(3):
        now += 0.005
        linger.arrived(now)
    assert linger.wait_s(now) == pytest.approx(0.010)
    linger.started()  # that batch went; the burst goes on
    now += 0.005
    linger.arrived(now)
    assert linger.wait_s(now) == pytest.approx(0.010)


def test_no_linger_at_zero_and_no_sub_millisecond_remainder() -> None:
    off = BatchLinger(max_linger_s=0, burst_gap_s=0.01)
    off.arrived(100.000)
    off.arrived(100.001)
    assert off.wait_s(100.001) == 0
    # A timer that fires a hair early (uvloop's millisecond clock) must not start another linger.
    linger = BatchLinger(max_linger_s=0.05, burst_gap_s=0.01)
    linger.arrived(100.000)
    linger.arrived(100.001)
    assert linger.wait_s(100.011 - 1e-9) == 0


# --- finishing: encoding, uploads, events and settlement beside the next run ---------------


class GatedPixels:
    """A Pillow image whose encoding waits for ``gate`` (at most 30 s): an encoder as slow as the
    test wants. (Pillow is outside our walls; everything else here is real.)"""

    def __init__(self, color: str, gate: threading.Event) -> None:
        self._image = Image.new("RGB", (8, 8), color)
        self.gate = gate
        self.encoding = threading.Event()
        self.gate_was_open: bool | None = None
        self.mode, self.width, self.height = self._image.mode, self._image.width, self._image.height

    def save(self, fp: Any, **options: Any) -> None:
        self.encoding.set()
        self.gate_was_open = self.gate.wait(30)
        self._image.save(fp, **options)

    def close(self) -> None:
        self._image.close()


@pytest.fixture
async def memory_bus() -> Any:
    bus = await connect_bus(f"memory://{uuid.uuid4().hex}", BusOptions(namespace=f"f{uuid.uuid4().hex[:10]}"))
    yield bus
    await bus.close()


async def test_the_next_batch_runs_while_the_last_ones_images_are_encoded(
    memory_bus: Bus, object_store: ObjectStore
) -> None:
    second_call = threading.Event()
    pixels = GatedPixels("red", second_call)  # the first job's image encodes once the next call runs
    first, second = _command(model="a"), _command(model="b")
    backend = BatchingBackend(
        steps=1,
        render=lambda job, index: RenderedImage(
            cast(PILImage, pixels if job.job_id == first.job_id else Image.new("RGB", (8, 8), "blue")), seed=index
        ),
        on_call=_set_on_call(2, second_call),
    )
    for command in (first, second):
        await memory_bus.publish_command(command)
    await _worker(memory_bus, object_store, backend).run(idle_timeout_s=0.5)

    assert pixels.gate_was_open, "the second call waited for the first job's encoding"
    for command in (first, second):
        assert sum(isinstance(e, JobSucceeded) for e in await logged_events(memory_bus, command.job_id)) == 1


async def test_a_job_canceled_while_its_images_are_encoded_is_settled_at_once(
    memory_bus: Bus, object_store: ObjectStore
) -> None:
    release = threading.Event()
    pixels = GatedPixels("red", release)
    command = _command()
    backend = BatchingBackend(steps=1, render=lambda job, index: RenderedImage(cast(PILImage, pixels), seed=index))
    await memory_bus.publish_command(command)
    run = asyncio.create_task(_worker(memory_bus, object_store, backend).run(idle_timeout_s=0.5))
    try:
        assert await asyncio.to_thread(pixels.encoding.wait, 30)
        async with memory_bus.watch_events(command.job_id) as live:
            await memory_bus.publish_control(CancelJob(job_id=command.job_id, backend="batching", reason="too slow"))
            async with asyncio.timeout(10):
                canceled = await anext(event async for event in live if isinstance(event, JobCanceled))
        assert isinstance(canceled, JobCanceled) and canceled.reason == "too slow"
        assert not release.is_set()  # settled while the encoding still held its image
    finally:
        release.set()
    await run
    events = await logged_events(memory_bus, command.job_id)
    assert [type(e) for e in events] == [JobStarted, JobCanceled]
    everything = await object_store.list_expired(datetime(9999, 1, 1, tzinfo=UTC))
    assert [obj for obj in everything if obj.job_id == command.job_id] == []


async def test_sigterm_lets_a_job_being_encoded_finish(memory_bus: Bus, object_store: ObjectStore) -> None:
    release = threading.Event()
    pixels = GatedPixels("red", release)
    command = _command()
    backend = BatchingBackend(steps=1, render=lambda job, index: RenderedImage(cast(PILImage, pixels), seed=index))
    await memory_bus.publish_command(command)
    stop = asyncio.Event()
    run = asyncio.create_task(_worker(memory_bus, object_store, backend, shutdown_grace_s=30).run(stop=stop))
    assert await asyncio.to_thread(pixels.encoding.wait, 30)
    stop.set()
    await asyncio.sleep(0)
    release.set()
    await asyncio.wait_for(run, 30)
    events = await logged_events(memory_bus, command.job_id)
    assert [type(e) for e in events] == [JobStarted, ImageStored, JobSucceeded]


@pytest.mark.parametrize(
    ("image_format", "content_type", "extension", "pillow_format"),
    [
        (ImageFormat(), "image/png", "png", "PNG"),
        (ImageFormat("webp", quality=80), "image/webp", "webp", "WEBP"),
        (ImageFormat("jpeg", quality=85), "image/jpeg", "jpg", "JPEG"),
    ],
)
async def test_pixels_are_stored_in_the_workers_image_format(
    image_format: ImageFormat,
    content_type: str,
    extension: str,
    pillow_format: str,
    memory_bus: Bus,
    object_store: ObjectStore,
) -> None:
    command = _command(num_images=2)
    backend = BatchingBackend(steps=1, render=lambda job, index: RenderedImage(Image.new("RGB", (8, 8), "red"), index))
    await memory_bus.publish_command(command)
    await _worker(memory_bus, object_store, backend, image_format=image_format).run(idle_timeout_s=0.5)

    stored = [e for e in await logged_events(memory_bus, command.job_id) if isinstance(e, ImageStored)]
    assert sorted(e.index for e in stored) == [0, 1]
    for event in stored:
        assert event.content_type == content_type and event.object_key.endswith(f".{extension}")
        data = b"".join([chunk async for chunk in object_store.get_stream(event.object_key)])
        assert event.size_bytes == len(data)
        decoded = Image.open(io.BytesIO(data))
        assert decoded.format == pillow_format and decoded.size == (8, 8)
        if pillow_format == "PNG":  # lossless
            assert decoded.convert("RGB").getpixel((0, 0)) == (255, 0, 0)


def test_the_image_format_comes_from_the_workers_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert worker_options(WorkerSettings(worker_id="w")).image_format == ImageFormat("png", 90, 1)
    monkeypatch.setenv("IMAGEBUS_WORKER_IMAGE_FORMAT", "webp")
    monkeypatch.setenv("IMAGEBUS_WORKER_IMAGE_QUALITY", "70")
    assert worker_options(WorkerSettings(worker_id="w")).image_format == ImageFormat("webp", 70, 1)
