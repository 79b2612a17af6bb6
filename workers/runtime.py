"""The worker runtime: take GenerateImage commands for one backend, run them, settle each once.

``handle`` runs a delivery to an Outcome; ``settle`` is the one place that emits the terminal
event and acks, naks or hands back. Heartbeats keep long jobs from being redelivered, a cancel
token stops a job between steps, and SIGTERM drains (finish or hand back) within a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from bus import Bus, CommandDelivery
from schemas import (
    CancelJob,
    GenerateImage,
    ImageStored,
    JobCanceled,
    JobFailed,
    JobStarted,
    JobSucceeded,
    image_id_for,
)
from storage.object_store import ObjectStore
from workers.backends.base import Backend, CancelToken, GenerationCanceled, RetryableError
from workers.outcomes import Canceled, Failed, HandBack, Outcome, Retry, Succeeded
from workers.progress import ProgressPublisher

log = structlog.get_logger(__name__)

_SHUTDOWN = "worker shutting down"


@dataclass(frozen=True)
class WorkerOptions:
    worker_id: str
    image_ttl_s: float = 600.0
    heartbeat_interval_s: float = 10.0
    max_deliveries: int = 5
    shutdown_grace_s: float = 25.0


class Worker:
    def __init__(self, bus: Bus, store: ObjectStore, backend: Backend, options: WorkerOptions) -> None:
        self._bus = bus
        self._store = store
        self._backend = backend
        self._options = options
        # One thread: the backend (torch) runs one job at a time and keeps its state on that thread.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{backend.name}-backend")
        self._running: dict[str, CancelToken] = {}
        # Cancels that arrived before their job did (bounded: only recent ones matter).
        self._canceled_early: OrderedDict[str, str] = OrderedDict()
        self._in_flight: asyncio.Future[None] | None = None
        self.handled = 0

    async def prepare(self, models: list[str]) -> None:
        loop = asyncio.get_running_loop()
        for model in models:
            await loop.run_in_executor(self._executor, self._backend.prepare, model)

    async def run(self, *, stop: asyncio.Event | None = None, idle_timeout_s: float | None = None) -> int:
        """Consume until ``stop`` is set (draining gracefully) or, in burst mode, until idle."""
        stop = stop or asyncio.Event()
        async with self._bus.watch_control(self._backend.name) as controls:
            control_task = asyncio.create_task(self._follow_controls(controls))
            consume_task = asyncio.create_task(self._consume(stop, idle_timeout_s))
            stop_task = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait({consume_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
                if not consume_task.done():
                    await self._drain(consume_task)
                await consume_task
            finally:
                for task in (control_task, stop_task, consume_task):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        self._executor.shutdown(wait=False, cancel_futures=True)
        return self.handled

    async def _consume(self, stop: asyncio.Event, idle_timeout_s: float | None) -> None:
        consume = self._bus.consume_commands(self._backend.name, idle_timeout_s=idle_timeout_s)
        async with consume as deliveries:
            async for delivery in deliveries:
                if stop.is_set():
                    await delivery.nak()
                    return
                self._in_flight = asyncio.ensure_future(self._process(delivery))
                # Shielded: a shutdown cancels the wait for the next delivery, never a job in flight.
                await asyncio.shield(self._in_flight)
                if stop.is_set():
                    return

    async def _drain(self, consume_task: asyncio.Task[None]) -> None:
        """On stop: let the job in flight finish within the grace period, else cancel it (handed back)."""
        in_flight = self._in_flight
        if in_flight is not None and not in_flight.done():
            log.info("draining", in_flight=list(self._running), grace_s=self._options.shutdown_grace_s)
            done, _ = await asyncio.wait({in_flight}, timeout=self._options.shutdown_grace_s)
            if not done:
                for token in self._running.values():
                    token.cancel(_SHUTDOWN)
                await asyncio.wait({in_flight}, timeout=self._options.shutdown_grace_s)
        consume_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consume_task

    async def _follow_controls(self, controls: AsyncIterator[CancelJob]) -> None:
        async for control in controls:
            token = self._running.get(control.job_id)
            if token is not None:
                token.cancel(control.reason)
            else:
                self._canceled_early[control.job_id] = control.reason
                while len(self._canceled_early) > 10_000:
                    self._canceled_early.popitem(last=False)

    async def _process(self, delivery: CommandDelivery) -> None:
        command = delivery.command
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            job_id=command.job_id, backend=self._backend.name, attempt=delivery.attempt
        )
        outcome = await self.handle(delivery)
        await self.settle(delivery, outcome)
        self.handled += 1

    async def handle(self, delivery: CommandDelivery) -> Outcome:
        command = delivery.command
        if command.job_id in self._canceled_early:
            return Canceled(self._canceled_early.pop(command.job_id))
        token = CancelToken()
        self._running[command.job_id] = token
        heartbeat = asyncio.create_task(self._heartbeat(delivery))
        try:
            await self._bus.publish_event(
                JobStarted(job_id=command.job_id, worker_id=self._options.worker_id, attempt=delivery.attempt)
            )
            image_ids = await self._generate_and_store(command, delivery.attempt, token)
            return Succeeded(image_ids)
        except GenerationCanceled as exc:
            return HandBack() if token.reason == _SHUTDOWN else Canceled(str(exc) or token.reason)
        except RetryableError as exc:
            if delivery.attempt >= self._options.max_deliveries:
                return Failed(f"gave up after {delivery.attempt} attempts: {exc}")
            return Retry(exc.delay_s, str(exc))
        except Exception as exc:
            log.exception("job_failed")
            return Failed(f"{type(exc).__name__}: {exc}")
        finally:
            heartbeat.cancel()
            self._running.pop(command.job_id, None)

    async def settle(self, delivery: CommandDelivery, outcome: Outcome) -> None:
        """The one ack point: terminal event first, then ack; or hand the delivery back."""
        job_id = delivery.command.job_id
        match outcome:
            case Succeeded(image_ids):
                await self._bus.publish_event(JobSucceeded(job_id=job_id, image_ids=image_ids))
                await delivery.ack()
            case Failed(error):
                await self._bus.publish_event(JobFailed(job_id=job_id, error=error))
                await delivery.ack()
            case Canceled(reason):
                await self._bus.publish_event(JobCanceled(job_id=job_id, reason=reason))
                await delivery.ack()
            case Retry(delay_s, error):
                log.warning("job_retry", delay_s=delay_s, error=error)
                await delivery.nak(delay_s)
            case HandBack():
                log.info("job_handed_back")
                await delivery.nak()
        log.info("job_settled", outcome=type(outcome).__name__)

    async def _generate_and_store(self, command: GenerateImage, attempt: int, token: CancelToken) -> list[str]:
        loop = asyncio.get_running_loop()
        params = command.params
        with ProgressPublisher(self._bus, command.job_id, attempt, loop) as progress:
            await loop.run_in_executor(self._executor, self._backend.prepare, params.model)
            images = await loop.run_in_executor(self._executor, self._backend.generate, params, progress, token)
            await progress.flush()
        image_ids = []
        for index, image in enumerate(images):
            token.raise_if_canceled()
            image_id = image_id_for(command.job_id, index)
            expires_at = datetime.now(UTC) + timedelta(seconds=self._options.image_ttl_s)
            key = ObjectStore.image_key(command.job_id, image_id, expires_at, image.content_type)
            stored = await self._store.put_stream(
                key, io.BytesIO(image.data), content_type=image.content_type, length=len(image.data)
            )
            await self._bus.publish_event(
                ImageStored(
                    job_id=command.job_id,
                    image_id=image_id,
                    index=index,
                    object_key=stored.key,
                    content_type=image.content_type,
                    width=image.width,
                    height=image.height,
                    size_bytes=stored.size_bytes,
                    seed=image.seed,
                    expires_at=expires_at,
                )
            )
            image_ids.append(image_id)
        return image_ids

    async def _heartbeat(self, delivery: CommandDelivery) -> None:
        while True:
            await asyncio.sleep(self._options.heartbeat_interval_s)
            try:
                await delivery.in_progress()
            except Exception as exc:
                log.warning("heartbeat_failed", error=str(exc))
