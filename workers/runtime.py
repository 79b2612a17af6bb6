"""The worker runtime: take GenerateImage commands for one queue, run them, settle each once.

Deliveries are *held* (read from the bus, heartbeated) until settled. The dispatcher starts up to
``backend.concurrency`` runs at once; a run is one job, or several compatible jobs in one batch when
the backend batches (``max_batch_images`` > 1, equal ``batch_key``). A batch that is not full waits
for batch-mates only while commands arrive in a burst (``workers.linger``); a lone job on an idle
worker starts at once. A run holds its slot only for the backend call: encoding, uploads, events and
settlement of its jobs (*finishing*) go on beside the next run. ``settle`` is the one place that
emits the terminal event and acks, naks or hands back. A cancel token stops a job between steps,
and a canceled job is settled at once whatever it is doing (its batch-mates go on). SIGTERM drains
(finish or hand back, finishing jobs included) within a grace period.

Two things keep a job from hanging or looping forever. A delivery past ``max_deliveries`` runs
(the bus's verdict delivery) is not run again: the job fails and the command is dead-lettered, so
a job that kills its worker every time stops there. And while a job runs the worker publishes a
``JobHeartbeat`` now and then, so the stall watchdog can tell a slow job from a dead worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from bus import Bus, CommandDelivery
from bus.tracing import attached, trace_context, tracer
from schemas import (
    CancelJob,
    Event,
    GenerateImage,
    JobCanceled,
    JobFailed,
    JobHeartbeat,
    JobStarted,
    JobSucceeded,
    UpstreamQuotaObserved,
    terminal_message_id,
)
from schemas.metrics import JOB_DURATION, JOB_QUEUE_SECONDS, WORKER_BUSY_RATIO, WORKER_BUSY_SECONDS, WORKER_SLOTS
from storage.object_store import ObjectStore
from workers.backends.base import (
    Backend,
    BackendImage,
    CancelToken,
    GenerationCanceled,
    JobRequest,
    RetryableError,
    SiteQuota,
)
from workers.encoding import ImageFormat
from workers.image_storing import ImageStorer
from workers.linger import BatchLinger
from workers.outcomes import Canceled, DeadLetter, Failed, HandBack, Outcome, Retry, Succeeded
from workers.progress import ProgressPublisher

log = structlog.get_logger(__name__)

_SHUTDOWN = "worker shutting down"
# How long a job whose events could not be published waits before it is offered again.
_BUS_RETRY_DELAY_S = 5.0
# Threads encoding finished images (Pillow releases the GIL while it compresses).
_ENCODING_THREADS = 2
# An upstream quota whose only change is its resets_at (a rolling window moves it on every
# answer) is published at most this often, not on nearly every job; figures that change
# (used, limit, remaining) are published at once.
_QUOTA_DRIFT_INTERVAL_S = 5.0

# What a backend call came to for one job: its images, or the error it ended in.
_Result = Sequence[BackendImage] | BaseException


class BusUnavailable(RetryableError):
    """An event of a running job could not be published: hand the job back, do not fail it (the
    bus rides out short outages itself; this is a longer one)."""


@dataclass(frozen=True)
class WorkerOptions:
    worker_id: str
    image_ttl_s: float = 600.0
    heartbeat_interval_s: float = 10.0
    # A running job's JobHeartbeat event at most this often (the stall watchdog's signal; the
    # broker's own heartbeat above is more frequent but invisible to the read model).
    heartbeat_event_interval_s: float = 60.0
    max_deliveries: int = 5
    shutdown_grace_s: float = 25.0
    # The work queue: a catalog pool, or None for the backend's shared queue.
    queue: str | None = None
    # The most a batch that is not full waits for batch-mates, and only while commands arrive less
    # than batch_burst_gap_s apart (workers.linger); a lone job on an idle worker never waits.
    batch_linger_s: float = 0.05
    batch_burst_gap_s: float = 0.01
    # How images a backend hands back as pixels are encoded.
    image_format: ImageFormat = field(default_factory=ImageFormat)
    # An OpenTelemetry SDK span per job, worth making only where an exporter takes it; without
    # one the job keeps its publisher's trace context, so logs and events carry its trace id.
    spans: bool = True


@dataclass(eq=False)
class _Held:
    """A delivery this worker holds: waiting for a slot, or running."""

    delivery: CommandDelivery
    held_at: float
    token: CancelToken = field(default_factory=CancelToken)
    settled: bool = False
    # Loop time of the JobStarted or the last JobHeartbeat; None while waiting for a slot.
    last_signal_at: float | None = None
    # The job's trace: the publisher's context, then this worker's span in it once the job runs.
    trace: otel_context.Context = field(default_factory=otel_context.Context)
    span: Span | None = None
    started_at: float | None = None

    @property
    def command(self) -> GenerateImage:
        return self.delivery.command

    @property
    def suspect(self) -> bool:
        """Delivered before: its last run may have killed its worker. It runs alone, so a job
        that crashes its worker takes no innocent job's delivery count down with it."""
        return self.delivery.attempt > 1


class Worker:
    def __init__(self, bus: Bus, store: ObjectStore, backend: Backend, options: WorkerOptions) -> None:
        self._bus = bus
        self._store = store
        self._backend = backend
        self._options = options
        self._queue = options.queue or backend.name
        self._concurrency = max(1, backend.concurrency)
        self._batch_images = max(1, backend.max_batch_images)
        # Held at most: every slot busy, as many batches finishing, and one full batch waiting, so a
        # batch is ready when a slot frees. (A crash charges a delivery to everything held;
        # redelivered jobs then run alone.)
        self._capacity = (2 * self._concurrency + 1) * self._batch_images
        self._held: dict[str, _Held] = {}
        self._waiting: list[_Held] = []
        self._runs: set[asyncio.Task[None]] = set()
        # Runs whose backend call is over: their jobs' encoding, uploads, events and settlement,
        # beside the next runs. At most one per slot, so finished images cannot pile up in memory.
        self._finishing: set[asyncio.Task[None]] = set()
        self._finishing_room = asyncio.Semaphore(self._concurrency)
        # Threads for encoding images, while run() runs (None: the loop's default ones).
        self._encoder: ThreadPoolExecutor | None = None
        self._images = ImageStorer(store, self._publish, options.image_format, options.image_ttl_s)
        # Settlements of canceled jobs, made while their run goes on.
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._linger = BatchLinger(options.batch_linger_s, options.batch_burst_gap_s)
        # The pending linger timer's due time (uvloop's timer handles have no when()).
        self._linger_due: float | None = None
        self._last_quota: SiteQuota | None = None
        self._last_quota_at = 0.0  # monotonic time of the last UpstreamQuotaObserved
        self._room = asyncio.Event()
        self._room.set()
        # Cancels that arrived before their job did (bounded: only recent ones matter).
        self._canceled_early: OrderedDict[str, str] = OrderedDict()
        self.handled = 0
        # Runs going on since (monotonic) when: the busy metrics.
        self._busy_slots = 0
        self._busy_since = time.monotonic()
        WORKER_SLOTS.labels(backend.name).set(self._concurrency)
        WORKER_BUSY_RATIO.labels(backend.name).set(0)

    @property
    def held_jobs(self) -> int:
        """Deliveries held now: waiting for a slot, running, or finishing."""
        return len(self._held)

    async def prepare(self, models: list[str]) -> None:
        for model in models:
            await self._backend.prepare(model)

    async def run(self, *, stop: asyncio.Event | None = None, idle_timeout_s: float | None = None) -> int:
        """Consume until ``stop`` is set (draining gracefully) or, in burst mode, until idle."""
        stop = stop or asyncio.Event()
        self._encoder = encoder = ThreadPoolExecutor(_ENCODING_THREADS, thread_name_prefix="encode")
        async with self._bus.watch_control(self._backend.name) as controls:
            control_task = asyncio.create_task(self._follow_controls(controls))
            heartbeat_task = asyncio.create_task(self._heartbeat())
            try:
                while await self._consume(stop, idle_timeout_s) and idle_timeout_s is not None:
                    pass  # burst mode: go on while the last session found work
            finally:
                for task in (control_task, heartbeat_task):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        encoder.shutdown(wait=False)
        await self._backend.close()
        return self.handled

    # --- consuming --------------------------------------------------------------------------

    async def _consume(self, stop: asyncio.Event, idle_timeout_s: float | None) -> bool:
        """One consumer session; True when it received anything. Every held delivery is settled
        before the session ends, since closing the consumer hands back whatever is unsettled."""
        received = False
        consume = self._bus.consume_commands(self._queue, idle_timeout_s=idle_timeout_s, prefetch=self._capacity)
        async with consume as deliveries:
            iterator = aiter(deliveries)
            stop_wait = asyncio.create_task(stop.wait())
            try:
                while not stop.is_set():
                    if not self._room.is_set():
                        room = asyncio.create_task(self._room.wait())
                        await asyncio.wait({room, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                        room.cancel()
                        continue
                    next_delivery = asyncio.ensure_future(anext(iterator, None))
                    await asyncio.wait({next_delivery, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                    if not next_delivery.done():
                        # Stopping: abandon the wait for the next delivery, never a job in flight.
                        next_delivery.cancel()
                        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                            await next_delivery
                        break
                    delivery = next_delivery.result()
                    if delivery is None:
                        break  # idle (burst mode) or the consumer closed
                    received = True
                    if stop.is_set():
                        await delivery.nak()
                        break
                    self._hold(delivery)
                if stop.is_set():
                    await self._drain()
                else:
                    await self._finish_runs()
            finally:
                stop_wait.cancel()
        return received

    def _hold(self, delivery: CommandDelivery) -> None:
        now = asyncio.get_running_loop().time()
        held = _Held(delivery, now, trace=trace_context(delivery.trace_headers))
        self._linger.arrived(now)
        self._held[delivery.command.job_id] = held
        self._waiting.append(held)
        self._update_room()
        self._dispatch()

    def _update_room(self) -> None:
        limit = 1 if any(held.suspect for held in self._held.values()) else self._capacity
        if len(self._held) < limit:
            self._room.set()
        else:
            self._room.clear()

    def _dispatch(self, *, linger: bool = True, timer_due: float | None = None) -> None:
        while self._waiting and len(self._runs) < self._concurrency:
            members = self._next_batch()
            if linger and self._should_linger(members, timer_due):
                return
            for held in members:
                self._waiting.remove(held)
            self._linger.started()
            task = asyncio.create_task(self._run_batch(members))
            self._runs.add(task)
            task.add_done_callback(self._run_done)
            self._count_busy()

    def _run_done(self, task: asyncio.Task[None]) -> None:
        self._runs.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("run_crashed", error=repr(error))
        self._count_busy()
        self._dispatch()

    def _count_busy(self) -> None:
        """Busy slots now, and slot-seconds busy since the last change."""
        now = time.monotonic()
        WORKER_BUSY_SECONDS.labels(self._backend.name).inc(self._busy_slots * (now - self._busy_since))
        self._busy_since = now
        self._busy_slots = len(self._runs)
        WORKER_BUSY_RATIO.labels(self._backend.name).set(self._busy_slots / self._concurrency)

    def _should_linger(self, members: list[_Held], timer_due: float | None) -> bool:
        """Hold a batch that is not full back while its batch-mates are likely on their way
        (commands published together reach us one by one); schedules the retry itself."""
        first = members[0]
        if first.suspect or self._batch_key(first.command) is None or len(self._held) >= self._capacity:
            return False
        if sum(held.command.params.num_images for held in members) >= self._batch_images:
            return False
        loop = asyncio.get_running_loop()
        # A timer may fire a little early by the loop's clock (uvloop rounds to milliseconds): the
        # time is at least the due time it was set for, so a linger that is over stays over.
        now = loop.time() if timer_due is None else max(loop.time(), timer_due)
        wait = self._linger.wait_s(now)
        if wait <= 0:
            return False
        # One timer at a time; when it fires the decision is taken again (arrivals since may have
        # extended the burst). Its due time is kept here: uvloop's timer handles have no when().
        if self._linger_due is None:
            self._linger_due = now + wait
            loop.call_later(wait, self._linger_over)
        return True

    def _linger_over(self) -> None:
        due, self._linger_due = self._linger_due, None
        self._dispatch(timer_due=due)

    def _next_batch(self) -> list[_Held]:
        """The oldest waiting job, plus the waiting jobs the backend can run in the same call."""
        first = self._waiting[0]
        members = [first]
        key = None if first.suspect else self._batch_key(first.command)
        if key is None:
            return members
        images = first.command.params.num_images
        for held in self._waiting[1:]:
            wanted = held.command.params.num_images
            if images + wanted > self._batch_images:
                continue
            if held.suspect or held.command.job_id in self._canceled_early:
                continue
            if self._batch_key(held.command) == key:
                members.append(held)
                images += wanted
        return members

    def _batch_key(self, command: GenerateImage) -> Hashable | None:
        if self._batch_images <= 1 or command.params.num_images >= self._batch_images:
            return None
        return self._backend.batch_key(command.params)

    def _tasks(self) -> set[asyncio.Task[None]]:
        """Everything still working on held jobs: runs, finishing runs, early settlements."""
        return self._runs | self._finishing | self._side_tasks

    async def _finish_runs(self) -> None:
        while self._waiting or self._tasks():
            if tasks := self._tasks():
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            else:
                self._dispatch(linger=False)

    async def _drain(self) -> None:
        """On stop: waiting jobs go back at once; running and finishing ones finish within the grace
        period, else they are canceled and handed back."""
        for held in self._waiting:
            await self.settle(held, HandBack())
        self._waiting.clear()
        if not self._tasks():
            return
        log.info("draining", in_flight=list(self._held), grace_s=self._options.shutdown_grace_s)
        if not await self._tasks_done_within(self._options.shutdown_grace_s):
            for held in self._held.values():
                held.token.cancel(_SHUTDOWN)
            await self._tasks_done_within(self._options.shutdown_grace_s)

    async def _tasks_done_within(self, seconds: float) -> bool:
        """Wait for every task, those started meanwhile too (a run hands its jobs on to a
        finishing task); False if some are still going after ``seconds``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while tasks := self._tasks():
            left = deadline - loop.time()
            if left <= 0:
                return False
            await asyncio.wait(tasks, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        return True

    async def _follow_controls(self, controls: AsyncIterator[CancelJob]) -> None:
        async for control in controls:
            held = self._held.get(control.job_id)
            if held is not None:
                held.token.cancel(control.reason)
                if held in self._waiting:
                    # Not started yet: nothing to interrupt, settle it now.
                    self._waiting.remove(held)
                    await self.settle(held, Canceled(control.reason))
            else:
                self._canceled_early[control.job_id] = control.reason
                while len(self._canceled_early) > 10_000:
                    self._canceled_early.popitem(last=False)

    async def _heartbeat(self) -> None:
        """Push the redelivery deadline of every held delivery back, running or waiting, and tell
        the read model which running jobs are alive."""
        loop = asyncio.get_running_loop()
        interval_s = min(self._options.heartbeat_interval_s, self._options.heartbeat_event_interval_s)
        while True:
            await asyncio.sleep(interval_s)
            for held in list(self._held.values()):
                if held.settled:
                    continue
                try:
                    await held.delivery.in_progress()
                    if (
                        held.last_signal_at is not None
                        and loop.time() - held.last_signal_at >= self._options.heartbeat_event_interval_s
                    ):
                        held.last_signal_at = loop.time()
                        await self._bus.publish_event(
                            JobHeartbeat(
                                job_id=held.command.job_id,
                                worker_id=self._options.worker_id,
                                attempt=held.delivery.attempt,
                            )
                        )
                except Exception as exc:
                    log.warning("heartbeat_failed", job_id=held.command.job_id, error=str(exc))

    # --- running ----------------------------------------------------------------------------

    async def _run_batch(self, members: list[_Held]) -> None:
        for held in members:
            self._begin_trace(held)
        if len(members) == 1:
            # A run of one job is that job's: everything in it, logs included, is in its trace.
            with attached(members[0].trace):
                await self._run_members(members)
        else:
            await self._run_members(members)

    def _begin_trace(self, held: _Held) -> None:
        """This worker's span for the job, a child of the publisher's (the ingress request)."""
        if not self._options.spans:
            return  # held.trace already is the publisher's: its trace id reaches logs and events
        command = held.command
        held.span = tracer.start_span(
            f"generate {self._backend.name}",
            context=held.trace,
            kind=SpanKind.CONSUMER,
            attributes={
                "imagebus.job_id": command.job_id,
                "imagebus.backend": self._backend.name,
                "imagebus.model": command.params.model,
                "imagebus.attempt": held.delivery.attempt,
            },
        )
        held.trace = trace.set_span_in_context(held.span, held.trace)

    async def _run_members(self, members: list[_Held]) -> None:
        structlog.contextvars.clear_contextvars()
        if len(members) == 1:
            structlog.contextvars.bind_contextvars(
                job_id=members[0].command.job_id, backend=self._backend.name, attempt=members[0].delivery.attempt
            )
        else:
            structlog.contextvars.bind_contextvars(
                job_ids=[held.command.job_id for held in members], backend=self._backend.name
            )
            await asyncio.sleep(0)  # let cancels already in the inbox land before the batch starts
        live = []
        for held in members:
            reason = self._canceled_early.pop(held.command.job_id, None)
            if reason is not None:
                await self.settle(held, Canceled(reason))
            elif (runs := held.delivery.attempt - 1) >= self._options.max_deliveries:
                # The verdict delivery: every earlier run ended without settling (its worker was
                # killed, stalled, or stopped), so this job would most likely kill us too.
                await self.settle(
                    held,
                    DeadLetter(
                        f"dead-lettered after {runs} deliveries that never finished "
                        "(the worker crashed, stalled or was stopped each time)"
                    ),
                )
            else:
                live.append(held)
        if not live:
            return
        loop = asyncio.get_running_loop()
        for held in live:
            # A cancel settles the job at once, running or finishing; its batch-mates go on.
            held.token.on_cancel(self._settle_canceled_later(loop, held))
        publishing = contextlib.ExitStack()
        try:
            publishers = [self._progress_publisher(held, publishing) for held in live]
            results = await self._call_backend(live, publishers)
            # The model is free for the next run once a finishing place is: at most one batch of
            # finished images per slot waits in memory for encoding and upload.
            await self._finishing_room.acquire()
        except BaseException:
            publishing.close()
            raise
        task = asyncio.create_task(self._finish(live, results, publishing, publishers))
        self._finishing.add(task)
        task.add_done_callback(self._finish_done)

    def _progress_publisher(self, held: _Held, publishing: contextlib.ExitStack) -> ProgressPublisher:
        publisher = ProgressPublisher(self._bus, held.command.job_id, held.delivery.attempt, asyncio.get_running_loop())
        with attached(held.trace):  # its publishing task keeps the job's trace
            publishing.enter_context(publisher)
        return publisher

    async def _call_backend(self, members: list[_Held], publishers: list[ProgressPublisher]) -> list[_Result]:
        """The members' one backend call, after their JobStarted; one result per member.

        The members' JobStarted events are published together and confirmed before the model
        starts: a run the log does not show could kill its worker unseen (a poison job's attempts
        must all be on record), and a job whose start could not be recorded goes back to the queue
        without running."""
        jobs = [
            JobRequest(job_id=held.command.job_id, params=held.command.params, on_progress=publisher, cancel=held.token)
            for held, publisher in zip(members, publishers, strict=True)
        ]
        try:
            await asyncio.gather(*(self._announce_start(held) for held in members))
        except Exception as exc:
            return [exc] * len(members)
        try:
            await self._backend.prepare(members[0].command.params.model)
            if len(members) == 1:
                return [await self._backend.generate(jobs[0])]
            return list(await self._backend.generate_batch(jobs))
        except Exception as exc:
            return [exc] * len(members)

    async def _announce_start(self, held: _Held) -> None:
        with attached(held.trace):
            await self._publish(
                JobStarted(job_id=held.command.job_id, worker_id=self._options.worker_id, attempt=held.delivery.attempt)
            )
        held.last_signal_at = asyncio.get_running_loop().time()
        held.started_at = time.monotonic()
        waited = (datetime.now(UTC) - held.command.occurred_at).total_seconds()
        JOB_QUEUE_SECONDS.labels(self._backend.name, held.command.params.model).observe(max(waited, 0.0))

    async def _finish(
        self,
        members: list[_Held],
        results: list[_Result],
        publishing: contextlib.ExitStack,
        publishers: list[ProgressPublisher],
    ) -> None:
        """Beside the next run: each member's progress out, images encoded, stored and announced,
        then its settlement; the members concurrently."""
        with publishing:
            for publisher in publishers:
                await publisher.flush()
        await asyncio.gather(*(self._finish_job(held, result) for held, result in zip(members, results, strict=True)))
        await self._report_upstream_quota(members[0].command.job_id)

    def _finish_done(self, task: asyncio.Task[None]) -> None:
        self._finishing.discard(task)
        self._finishing_room.release()
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("finishing_crashed", error=repr(error))

    async def _finish_job(self, held: _Held, result: _Result) -> None:
        await self.settle(held, await self._outcome(held, result))

    async def _report_upstream_quota(self, job_id: str) -> None:
        """Publish the outside service's quota when the backend has one and it changed."""
        try:
            quota = await self._backend.site_quota()
            if quota is None or not self._quota_news(quota):
                return
            await self._bus.publish_event(
                UpstreamQuotaObserved(
                    job_id=job_id,
                    backend=self._backend.name,
                    source=quota.source,
                    used=quota.used,
                    limit=quota.limit,
                    remaining=quota.remaining,
                    resets_at=quota.resets_at,
                )
            )
            self._last_quota = quota
            self._last_quota_at = time.monotonic()
        except Exception as exc:  # informational: never let it disturb the jobs
            log.warning("upstream_quota_failed", error=str(exc))

    def _quota_news(self, quota: SiteQuota) -> bool:
        """Whether ``quota`` is worth an event: its figures changed, or only its ``resets_at``
        moved (which a rolling window does on every answer) and the last event is old enough."""
        last = self._last_quota
        if last is None or replace(quota, resets_at=None) != replace(last, resets_at=None):
            return True
        return quota.resets_at != last.resets_at and (time.monotonic() - self._last_quota_at >= _QUOTA_DRIFT_INTERVAL_S)

    def _settle_canceled_later(self, loop: asyncio.AbstractEventLoop, held: _Held) -> Callable[[], None]:
        """A cancel listener (called on any thread) that settles ``held`` on the loop."""

        def listener() -> None:
            loop.call_soon_threadsafe(self._settle_canceled_soon, held)

        return listener

    def _settle_canceled_soon(self, held: _Held) -> None:
        if not held.settled and held.token.reason != _SHUTDOWN:
            task = asyncio.create_task(self.settle(held, Canceled(held.token.reason)))
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)

    async def _outcome(self, held: _Held, result: _Result) -> Outcome:
        if held.settled:
            return Canceled(held.token.reason)  # already settled early; settle() ignores it
        if isinstance(result, BaseException):
            return self._failure(held, result)
        try:
            with attached(held.trace):
                image_ids = await self._images.store_all(held.command.job_id, result, held.token, self._encoder)
                return Succeeded(image_ids)
        except Exception as exc:
            return self._failure(held, exc)

    def _failure(self, held: _Held, error: BaseException) -> Outcome:
        token = held.token
        if isinstance(error, GenerationCanceled) or token.canceled:
            return HandBack() if token.reason == _SHUTDOWN else Canceled(token.reason or str(error))
        if isinstance(error, RetryableError):
            if held.delivery.attempt >= self._options.max_deliveries:
                return Failed(f"gave up after {held.delivery.attempt} attempts: {error}")
            return Retry(error.delay_s, str(error))
        log.error("job_failed", job_id=held.command.job_id, error=f"{type(error).__name__}: {error}", exc_info=error)
        return Failed(f"{type(error).__name__}: {error}")

    async def _publish(self, event: Event) -> None:
        try:
            await self._bus.publish_event(event)
        except Exception as exc:
            raise BusUnavailable(f"could not publish {event.type}: {exc!r}", _BUS_RETRY_DELAY_S) from exc

    async def settle(self, held: _Held, outcome: Outcome) -> None:
        """The one ack point: terminal event first, then ack; or hand the delivery back. Once."""
        if held.settled:
            return
        held.settled = True
        with attached(held.trace):
            settled = await self._settle(held, outcome)
        if held.span is not None:
            held.span.set_attribute("imagebus.outcome", type(outcome).__name__)
            held.span.end()
        if settled and isinstance(outcome, Succeeded) and held.started_at is not None:
            duration = time.monotonic() - held.started_at
            JOB_DURATION.labels(self._backend.name, held.command.params.model).observe(duration)

    async def _settle(self, held: _Held, outcome: Outcome) -> bool:
        delivery = held.delivery
        job_id = delivery.command.job_id
        # Every terminal event of a job carries one id: a rerun after a crash between publish and
        # ack republishes it, and the log drops the copy.
        terminal_id = terminal_message_id(job_id)
        try:
            match outcome:
                case Succeeded(image_ids):
                    await self._bus.publish_event(
                        JobSucceeded(job_id=job_id, image_ids=image_ids, message_id=terminal_id)
                    )
                    await delivery.ack()
                case Failed(error):
                    await self._bus.publish_event(JobFailed(job_id=job_id, error=error, message_id=terminal_id))
                    await delivery.ack()
                case DeadLetter(error):
                    log.error("job_dead_lettered", job_id=job_id, attempt=delivery.attempt, error=error)
                    await self._bus.publish_event(JobFailed(job_id=job_id, error=error, message_id=terminal_id))
                    await delivery.term()
                case Canceled(reason):
                    await self._bus.publish_event(JobCanceled(job_id=job_id, reason=reason, message_id=terminal_id))
                    await delivery.ack()
                case Retry(delay_s, error):
                    log.warning("job_retry", job_id=job_id, delay_s=delay_s, error=error)
                    await delivery.nak(delay_s)
                case HandBack():
                    log.info("job_handed_back", job_id=job_id)
                    await delivery.nak()
        except Exception as exc:
            # The broker still has it unsettled and will offer it again (ack wait, or the closed
            # channel); never let one settlement stop the batch-mates' or the worker's.
            log.error("settle_failed", job_id=job_id, outcome=type(outcome).__name__, error=repr(exc))
            return False
        finally:
            # By identity: a newer delivery of the same job (after a reconnect) may be held by now.
            if self._held.get(job_id) is held:
                del self._held[job_id]
            self._update_room()
        self.handled += 1
        log.info("job_settled", job_id=job_id, outcome=type(outcome).__name__)
        return True
