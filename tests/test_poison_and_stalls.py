"""Jobs that kill their worker, and workers that go silent, with real worker processes.

A poison job (one that ends its worker process every time) is dead-lettered after
``max_deliveries`` runs and fails with the reason, while the restarted worker goes on with other
work. A frozen worker's job is re-run by another worker (the broker's ack wait), and with no
worker left to re-run it, the stall watchdog fails it instead of leaving it ``processing``.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from bus import Bus, BusOptions
from bus._names import AmqpNames, NatsNames
from imagebus.process import ManagedProcess
from schemas import JobFailed, JobStarted, JobSucceeded
from storage.object_store import S3Config
from tests.chaos_rig import role_env
from tests.stack import Stack, auth, running_stack
from workers.backends.base import Backend

MAX_DELIVERIES = 3  # running_stack's


class Supervisor:
    """Keeps one scripted worker process running, restarting it when it dies (as Kubernetes would)."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self._name = name
        self._env = env
        self._log_dir = log_dir
        self.restarts = 0
        self.process = self._start()
        self._task = asyncio.create_task(self._watch())

    def _start(self) -> ManagedProcess:
        return ManagedProcess(
            name=self._name,
            argv=[sys.executable, "-m", "tests.scripted_worker"],
            log_path=self._log_dir / f"{self._name}-{self.restarts}.log",
            env={**self._env, "WORKER_ID": self._name},
        ).start()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            if not self.process.alive():
                self.restarts += 1
                self.process = self._start()

    async def close(self) -> None:
        self._task.cancel()
        self.process.kill()


async def _submit(stack: Stack, prompt: str) -> str:
    body = {"prompt": prompt, "model": "tiny-sd", "width": 64, "height": 64, "num_inference_steps": 2}
    response = await stack.client.post("/api/generate", json=body, headers=auth())
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


async def _dead_letter_count(bus_url: str, options: BusOptions) -> int:
    """Commands in the dead-letter place, read from the broker itself."""
    if bus_url.startswith("nats"):
        import nats

        nc = await nats.connect(bus_url)
        try:
            info = await nc.jetstream().stream_info(NatsNames(options.namespace).dead_stream)
            return int(info.state.messages)
        finally:
            await nc.close()
    connection = await aio_pika.connect(bus_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(AmqpNames(options.namespace).dead_queue, passive=True)
        return int(queue.declaration_result.message_count or 0)


@asynccontextmanager
async def _stack(
    broker: str, request: pytest.FixtureRequest, s3: S3Config, backend: Backend, tmp_path: Path, **kw: Any
) -> AsyncIterator[tuple[Stack, str]]:
    bus_url = str(request.getfixturevalue(f"{broker}_url"))
    async with running_stack(bus_url, s3, f"sqlite:///{tmp_path}/rm.db", backend, workers=0, **kw) as stack:
        yield stack, bus_url


@pytest.mark.parametrize("broker", ["nats", "amqp"])
async def test_a_job_that_kills_its_worker_is_dead_lettered_and_failed(
    broker: str, request: pytest.FixtureRequest, storage_config: S3Config, tiny_backend: Backend, tmp_path: Path
) -> None:
    async with _stack(broker, request, storage_config, tiny_backend, tmp_path, ack_wait_s=2.0) as (stack, bus_url):
        supervisor = Supervisor("w1", role_env(bus_url, stack.options, storage_config), tmp_path)
        try:
            poison = await _submit(stack, "poison pill")
            healthy = await _submit(stack, "a healthy fox")
            failed = await stack.wait_for_status(poison, {"failed", "completed"}, timeout_s=90)
            assert failed["status"] == "failed", failed
            assert failed["error"].startswith(f"dead-lettered after {MAX_DELIVERIES} deliveries"), failed
            # Every run but the verdict killed the worker; each time it came back and went on.
            assert supervisor.restarts == MAX_DELIVERIES
            fine = await stack.wait_for_status(healthy, {"completed", "failed"})
            assert fine["status"] == "completed", fine
            events = await stack.events_for(poison)
            assert [e.attempt for e in events if isinstance(e, JobStarted)] == list(range(1, MAX_DELIVERIES + 1))
            assert len([e for e in events if isinstance(e, JobSucceeded | JobFailed)]) == 1
            assert await _dead_letter_count(bus_url, stack.options) == 1
            # No crash loop: the worker stays up and takes new work.
            later = await _submit(stack, "after the storm")
            assert (await stack.wait_for_status(later, {"completed", "failed"}))["status"] == "completed"
            assert supervisor.restarts == MAX_DELIVERIES
        finally:
            await supervisor.close()


async def _wait_started(bus: Bus, job_id: str, timeout_s: float = 60) -> JobStarted:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        async with bus.read_events(idle_timeout_s=0.2) as events:
            async for logged in events:
                if isinstance(logged.event, JobStarted) and logged.event.job_id == job_id:
                    return logged.event
        await asyncio.sleep(0.1)
    raise TimeoutError(f"job {job_id} never started")


@pytest.mark.parametrize("broker", ["nats", "amqp"])
async def test_a_frozen_workers_job_is_rerun_elsewhere_else_failed_as_stalled(
    broker: str, request: pytest.FixtureRequest, storage_config: S3Config, tiny_backend: Backend, tmp_path: Path
) -> None:
    async with _stack(
        broker, request, storage_config, tiny_backend, tmp_path, ack_wait_s=2.0, watchdog_stall_after_s=4.0
    ) as (stack, bus_url):
        env = {**role_env(bus_url, stack.options, storage_config), "HEARTBEAT_EVENT_INTERVAL_S": "0.5"}
        frozen = ManagedProcess(
            name="w-frozen",
            argv=[sys.executable, "-m", "tests.scripted_worker"],
            log_path=tmp_path / "w-frozen.log",
            env={**env, "WORKER_ID": "w-frozen"},
        ).start()
        spare: ManagedProcess | None = None
        try:
            # Alone, then frozen mid-job (SIGSTOP): no heartbeat reaches the broker or the log, and
            # no other worker exists to re-run it. The watchdog fails it.
            lonely = await _submit(stack, "slow and alone")
            await _wait_started(stack.bus, lonely)
            frozen.signal(signal.SIGSTOP)
            stalled = await stack.wait_for_status(lonely, {"failed", "completed"}, timeout_s=60)
            assert stalled["status"] == "failed", stalled
            assert stalled["error"].startswith("stalled: no sign of life from its worker"), stalled

            # With a second worker, the frozen worker's next job is re-run there and completes.
            rerun = await _submit(stack, "slow but rescued")
            spare = ManagedProcess(
                name="w-spare",
                argv=[sys.executable, "-m", "tests.scripted_worker"],
                log_path=tmp_path / "w-spare.log",
                env={**env, "WORKER_ID": "w-spare"},
            ).start()
            done = await stack.wait_for_status(rerun, {"failed", "completed"}, timeout_s=90)
            assert done["status"] == "completed", done
            starts = [(e.worker_id, e.attempt) for e in await stack.events_for(rerun) if isinstance(e, JobStarted)]
            assert starts[-1][0] == "w-spare", starts

            # Thawed, the frozen worker finishes its old job late: the log keeps one terminal event
            # (NATS drops the copy by its id) and the read model the first one, the stall.
            frozen.signal(signal.SIGCONT)
            await asyncio.sleep(6)
            assert (await stack.wait_for_status(lonely, {"failed"}))["error"].startswith("stalled")
            terminals = [e for e in await stack.events_for(lonely) if isinstance(e, JobSucceeded | JobFailed)]
            assert terminals[0].type == "JobFailed"
            assert len(terminals) == (1 if broker == "nats" else len(terminals))
        finally:
            frozen.kill()
            if spare is not None:
                spare.kill()
