"""The worker runtime's one ack point, retries, heartbeats, cancellation and graceful shutdown.

Scripted backends (one per failure mode) stand in for the generator; everything else is real:
the bus (memory and NATS), the object store, the events.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from PIL import Image

from bus import Bus, BusOptions, connect_bus
from schemas import (
    CancelJob,
    GenerateImage,
    GenerationParams,
    ImageStored,
    JobCanceled,
    JobFailed,
    JobHeartbeat,
    JobProgress,
    JobStarted,
    JobSucceeded,
    UpstreamQuotaObserved,
    terminal_message_id,
)
from storage.object_store import ObjectStore
from tests.bus_events import logged_events, watched_events
from workers.backends.base import (
    CancelToken,
    GeneratedImage,
    JobRequest,
    Progress,
    ProgressCallback,
    RetryableError,
    SiteQuota,
)
from workers.runtime import Worker, WorkerOptions


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(out, format="PNG")
    return out.getvalue()


class ScriptedBackend:
    """Runs ``steps`` steps of ``step_s`` each.

    The first ``retryable_failures`` calls raise RetryableError; call number ``error_on_call`` raises ``error``.
    """

    name = "scripted"
    concurrency = 1
    max_batch_images = 1

    def __init__(
        self,
        *,
        steps: int = 3,
        step_s: float = 0.0,
        retryable_failures: int = 0,
        error: Exception | None = None,
        error_on_call: int = 1,
    ) -> None:
        self.steps = steps
        self.step_s = step_s
        self.retryable_failures = retryable_failures
        self.error = error
        self.error_on_call = error_on_call
        self.calls = 0
        self.started = threading.Event()

    async def prepare(self, model: str) -> None:
        pass

    async def generate(self, job: JobRequest) -> list[GeneratedImage]:
        # The blocking part on a thread, as real backends do, so cancels and heartbeats get through.
        return await asyncio.to_thread(self._generate, job.params, job.on_progress, job.cancel)

    def batch_key(self, params: GenerationParams) -> None:
        return None

    async def generate_batch(self, jobs: list[JobRequest]) -> list[list[GeneratedImage] | BaseException]:
        raise NotImplementedError

    async def site_quota(self) -> None:
        return None

    async def close(self) -> None:
        pass

    def _generate(
        self, params: GenerationParams, on_progress: ProgressCallback, cancel: CancelToken
    ) -> list[GeneratedImage]:
        self.calls += 1
        self.started.set()
        if self.calls <= self.retryable_failures:
            raise RetryableError("upstream busy", delay_s=0.05)
        if self.error is not None and self.calls == self.error_on_call:
            raise self.error
        for step in range(1, self.steps + 1):
            time.sleep(self.step_s)
            cancel.raise_if_canceled()
            on_progress(Progress(step=step, total_steps=self.steps))
        return [GeneratedImage.from_bytes(_png(), "image/png", 8, 8, seed=i) for i in range(params.num_images)]


def _command(num_images: int = 1) -> GenerateImage:
    job_id = uuid.uuid4().hex
    params = GenerationParams(
        prompt="p", model="m", width=8, height=8, num_inference_steps=3, guidance_scale=1.0, num_images=num_images
    )
    return GenerateImage(job_id=job_id, message_id=job_id, owner="o", backend="scripted", params=params)


@pytest.fixture(params=["memory", "nats"])
async def worker_bus(request: pytest.FixtureRequest) -> Any:
    url = f"memory://{uuid.uuid4().hex}" if request.param == "memory" else request.getfixturevalue("nats_url")
    bus = await connect_bus(url, BusOptions(namespace=f"t{uuid.uuid4().hex[:10]}", ack_wait_s=2.0, max_deliveries=3))
    yield bus
    await bus.close()


def _worker(bus: Bus, store: ObjectStore, backend: ScriptedBackend, **options: Any) -> Worker:
    defaults: dict[str, Any] = {"worker_id": "w", "max_deliveries": 3, "heartbeat_interval_s": 0.3}
    return Worker(bus, store, backend, WorkerOptions(**{**defaults, **options}))


async def test_success_stores_images_and_acks_once(worker_bus: Bus, object_store: ObjectStore) -> None:
    command = _command(num_images=2)
    await worker_bus.publish_command(command)
    async with watched_events(worker_bus) as watched:
        await _worker(worker_bus, object_store, ScriptedBackend()).run(idle_timeout_s=0.5)
    events = await logged_events(worker_bus, command.job_id)
    assert [type(e) for e in events] == [JobStarted, ImageStored, ImageStored, JobSucceeded]
    assert sorted(e.index for e in events if isinstance(e, ImageStored)) == [0, 1]
    # Progress is live only: watchers see it, the log does not keep it.
    assert [e.step for e in watched if isinstance(e, JobProgress)] == [1, 2, 3]
    assert await worker_bus.command_backlog("scripted") == 0


async def test_retryable_errors_are_retried_then_succeed(worker_bus: Bus, object_store: ObjectStore) -> None:
    command = _command()
    await worker_bus.publish_command(command)
    backend = ScriptedBackend(retryable_failures=2)
    await _worker(worker_bus, object_store, backend).run(idle_timeout_s=1.0)
    events = await logged_events(worker_bus, command.job_id)
    assert [e.attempt for e in events if isinstance(e, JobStarted)] == [1, 2, 3]
    assert sum(isinstance(e, JobSucceeded) for e in events) == 1
    assert not any(isinstance(e, JobFailed) for e in events)


async def test_retries_are_bounded(worker_bus: Bus, object_store: ObjectStore) -> None:
    command = _command()
    await worker_bus.publish_command(command)
    await _worker(worker_bus, object_store, ScriptedBackend(retryable_failures=99)).run(idle_timeout_s=1.0)
    events = await logged_events(worker_bus, command.job_id)
    failed = [e for e in events if isinstance(e, JobFailed)]
    assert len(failed) == 1 and "gave up after 3 attempts: upstream busy" in failed[0].error
    assert await worker_bus.command_backlog("scripted") == 0


async def test_permanent_error_fails_the_job_and_the_worker_goes_on(worker_bus: Bus, object_store: ObjectStore) -> None:
    broken, fine = _command(), _command()
    await worker_bus.publish_command(broken)
    await worker_bus.publish_command(fine)
    backend = ScriptedBackend(error=ValueError("model file is corrupt"))
    worker = _worker(worker_bus, object_store, backend)
    await worker.run(idle_timeout_s=0.5)
    failed = [e for e in await logged_events(worker_bus, broken.job_id) if isinstance(e, JobFailed)]
    assert [e.error for e in failed] == ["ValueError: model file is corrupt"]
    assert any(isinstance(e, JobSucceeded) for e in await logged_events(worker_bus, fine.job_id))


async def test_heartbeats_keep_a_long_job_from_being_redelivered(worker_bus: Bus, object_store: ObjectStore) -> None:
    command = _command()
    await worker_bus.publish_command(command)
    # 5 s of work against a 2 s ack wait: only heartbeats keep it ours.
    await _worker(worker_bus, object_store, ScriptedBackend(steps=10, step_s=0.5)).run(idle_timeout_s=0.5)
    events = await logged_events(worker_bus, command.job_id)
    assert [e.attempt for e in events if isinstance(e, JobStarted)] == [1]
    assert sum(isinstance(e, JobSucceeded) for e in events) == 1


async def test_cancel_stops_the_job_between_steps(worker_bus: Bus, object_store: ObjectStore) -> None:
    command = _command()
    await worker_bus.publish_command(command)
    backend = ScriptedBackend(steps=50, step_s=0.05)
    async with watched_events(worker_bus) as watched:
        run = asyncio.create_task(_worker(worker_bus, object_store, backend).run(idle_timeout_s=0.5))
        await asyncio.to_thread(backend.started.wait, 10)
        await worker_bus.publish_control(CancelJob(job_id=command.job_id, backend="scripted", reason="user asked"))
        await run
    events = await logged_events(worker_bus, command.job_id)
    assert [e.reason for e in events if isinstance(e, JobCanceled)] == ["user asked"]
    assert max((e.step for e in watched if isinstance(e, JobProgress)), default=0) < 50
    assert not any(isinstance(e, ImageStored | JobSucceeded) for e in events)


async def test_sigterm_lets_a_short_job_finish(worker_bus: Bus, object_store: ObjectStore) -> None:
    command = _command()
    await worker_bus.publish_command(command)
    backend = ScriptedBackend(steps=5, step_s=0.1)
    stop = asyncio.Event()
    run = asyncio.create_task(_worker(worker_bus, object_store, backend, shutdown_grace_s=5).run(stop=stop))
    await asyncio.to_thread(backend.started.wait, 10)
    stop.set()
    await asyncio.wait_for(run, 10)
    assert any(isinstance(e, JobSucceeded) for e in await logged_events(worker_bus, command.job_id))


async def test_sigterm_hands_a_long_job_back_to_another_worker(worker_bus: Bus, object_store: ObjectStore) -> None:
    command = _command()
    await worker_bus.publish_command(command)
    slow = ScriptedBackend(steps=100, step_s=0.05)
    stop = asyncio.Event()
    run = asyncio.create_task(_worker(worker_bus, object_store, slow, shutdown_grace_s=0.3).run(stop=stop))
    await asyncio.to_thread(slow.started.wait, 10)
    stop.set()
    await asyncio.wait_for(run, 10)
    events = await logged_events(worker_bus, command.job_id)
    assert not any(isinstance(e, JobSucceeded | JobFailed | JobCanceled) for e in events), events

    await _worker(worker_bus, object_store, ScriptedBackend(), worker_id="w2").run(idle_timeout_s=1.0)
    events = await logged_events(worker_bus, command.job_id)
    started = [(e.worker_id, e.attempt) for e in events if isinstance(e, JobStarted)]
    # Attempt 3 on NATS when the hand-back landed in the stopping worker's open pull request first
    # (it naks it on the way out: one more delivery counted, none lost).
    assert started[0] == ("w", 1) and started[1:] in ([("w2", 2)], [("w2", 3)]), started
    assert sum(isinstance(e, JobSucceeded) for e in events) == 1


async def _dead_letters(bus: Bus, queue: str) -> int:
    """Commands in the bus's dead-letter place for ``queue``, read from the broker itself."""
    if hasattr(bus, "dead_letters"):
        return len(bus.dead_letters(queue))
    js = bus._js  # type: ignore[attr-defined]
    names = bus._names  # type: ignore[attr-defined]
    info = await js.stream_info(names.dead_stream, subjects_filter=names.dead_subject(queue))
    return int((info.state.subjects or {}).get(names.dead_subject(queue), 0))


async def test_a_job_whose_runs_never_finish_is_failed_and_dead_lettered(
    worker_bus: Bus, object_store: ObjectStore
) -> None:
    command = _command()
    await worker_bus.publish_command(command)
    # Three runs (max_deliveries) that die without settling, as a job that kills its worker would:
    # each delivery is taken and handed back unsettled by closing the consumer.
    for attempt in (1, 2, 3):
        async with worker_bus.consume_commands("scripted", idle_timeout_s=5) as deliveries:
            delivery = await anext(aiter(deliveries))
            assert delivery.attempt == attempt
    backend = ScriptedBackend()
    await _worker(worker_bus, object_store, backend).run(idle_timeout_s=1.0)

    assert backend.calls == 0  # the verdict delivery is never run
    events = await logged_events(worker_bus, command.job_id)
    failed = [e for e in events if isinstance(e, JobFailed)]
    assert len(failed) == 1 and failed[0].error.startswith("dead-lettered after 3 deliveries"), failed
    assert failed[0].message_id == terminal_message_id(command.job_id)
    assert await worker_bus.command_backlog("scripted") == 0
    assert await _dead_letters(worker_bus, "scripted") == 1


async def test_a_retried_job_still_gets_all_its_runs(worker_bus: Bus, object_store: ObjectStore) -> None:
    command = _command()
    await worker_bus.publish_command(command)
    # Two runs end in retryable errors; the third (the last allowed) succeeds: not dead-lettered.
    await _worker(worker_bus, object_store, ScriptedBackend(retryable_failures=2)).run(idle_timeout_s=1.0)
    events = await logged_events(worker_bus, command.job_id)
    assert [e.attempt for e in events if isinstance(e, JobStarted)] == [1, 2, 3]
    assert [e.type for e in events if isinstance(e, JobSucceeded | JobFailed)] == ["JobSucceeded"]
    assert await _dead_letters(worker_bus, "scripted") == 0


async def test_a_running_job_sends_heartbeat_events(worker_bus: Bus, object_store: ObjectStore) -> None:
    command = _command()
    await worker_bus.publish_command(command)
    backend = ScriptedBackend(steps=6, step_s=0.25)
    worker = _worker(worker_bus, object_store, backend, heartbeat_event_interval_s=0.3)
    await worker.run(idle_timeout_s=0.5)
    events = await logged_events(worker_bus, command.job_id)
    beats = [e for e in events if isinstance(e, JobHeartbeat)]
    # 1.5 s of work at one heartbeat per 0.3 s; a loaded machine may fire fewer, never none.
    assert len(beats) >= 2 and {(e.worker_id, e.attempt) for e in beats} == {("w", 1)}
    started = next(i for i, e in enumerate(events) if isinstance(e, JobStarted))
    finished = next(i for i, e in enumerate(events) if isinstance(e, JobSucceeded))
    assert all(started < events.index(beat) < finished for beat in beats)


async def test_a_second_terminal_event_of_a_job_is_dropped_by_the_log(
    worker_bus: Bus, object_store: ObjectStore
) -> None:
    command = _command()
    await worker_bus.publish_command(command)
    await _worker(worker_bus, object_store, ScriptedBackend()).run(idle_timeout_s=0.5)
    # A rerun after a crash between publish and ack would publish the job's terminal event again.
    await worker_bus.publish_event(
        JobFailed(job_id=command.job_id, error="late", message_id=terminal_message_id(command.job_id))
    )
    events = await logged_events(worker_bus, command.job_id)
    assert [e.type for e in events if isinstance(e, JobSucceeded | JobFailed | JobCanceled)] == ["JobSucceeded"]


class QuotaBackend(ScriptedBackend):
    """Answers every call with the same figures under a rolling window's ``resets_at``, which
    moves on every answer (as a remote API's rate-limit headers do)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(steps=1, **kwargs)
        self.remaining = 90

    async def site_quota(self) -> SiteQuota:  # type: ignore[override]
        return SiteQuota(
            "api", used=100 - self.remaining, limit=100, remaining=self.remaining, resets_at=datetime.now(UTC)
        )


async def _quota_events(bus: Bus) -> list[UpstreamQuotaObserved]:
    async with bus.read_events(idle_timeout_s=0.3) as events:
        return [logged.event async for logged in events if isinstance(logged.event, UpstreamQuotaObserved)]


async def test_a_quota_whose_only_change_is_its_reset_time_is_published_once_not_per_job(
    worker_bus: Bus, object_store: ObjectStore
) -> None:
    backend = QuotaBackend()
    for _ in range(4):
        await worker_bus.publish_command(_command())
    await _worker(worker_bus, object_store, backend).run(idle_timeout_s=0.5)
    assert backend.calls == 4
    [first] = await _quota_events(worker_bus)
    assert (first.used, first.limit, first.remaining) == (10, 100, 90)

    # Figures that change are news at once.
    backend.remaining = 89
    await worker_bus.publish_command(_command())
    await _worker(worker_bus, object_store, backend).run(idle_timeout_s=0.5)
    assert [e.remaining for e in await _quota_events(worker_bus)] == [90, 89]
