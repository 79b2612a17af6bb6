"""What the worker benchmarks share: a throwaway S3 server, and timing jobs through a Worker."""

from __future__ import annotations

import asyncio
import secrets
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from bus import BusOptions, connect_bus
from imagebus.s3_server import start_s3_server
from schemas import GenerateImage, GenerationParams, JobFailed, JobSucceeded
from storage.object_store import ObjectStore, S3Config
from workers.backends.base import Backend
from workers.runtime import Worker, WorkerOptions


@asynccontextmanager
async def bench_store() -> AsyncIterator[ObjectStore]:
    """SeaweedFS (``weed mini``) in a temporary folder, with an empty bucket; stopped afterwards."""
    root = Path(tempfile.mkdtemp(prefix="imagebus-bench-s3-"))
    server = start_s3_server(
        root / "data", access_key="bench", secret_key=secrets.token_urlsafe(24), log_path=root / "weed.log"
    )
    try:
        store = ObjectStore(S3Config(server.endpoint, server.access_key, server.secret_key, bucket="bench"))
        await store.ensure_bucket()
        yield store
    finally:
        server.stop(grace_s=3.0)


async def seconds_through_worker(backend: Backend, store: ObjectStore, jobs: list[GenerationParams]) -> float:
    """Seconds from the first publish until the last JobSucceeded, one Worker on a ``memory://`` bus."""
    bus = await connect_bus(f"memory://{uuid.uuid4().hex}", BusOptions(namespace=f"bench{uuid.uuid4().hex[:8]}"))
    worker = Worker(bus, store, backend, WorkerOptions(worker_id="bench", heartbeat_interval_s=5.0))
    commands = [
        GenerateImage(job_id=job_id, message_id=job_id, owner="bench", backend=backend.name, params=params)
        for job_id, params in ((uuid.uuid4().hex, params) for params in jobs)
    ]
    try:
        async with bus.watch_events() as live:
            start = time.perf_counter()
            run = asyncio.create_task(worker.run(idle_timeout_s=0.5))
            for command in commands:
                await bus.publish_command(command)
            finished = 0
            async for event in live:
                if isinstance(event, JobFailed):
                    raise RuntimeError(f"job {event.job_id} failed: {event.error}")
                if isinstance(event, JobSucceeded):
                    finished += 1
                    if finished == len(commands):
                        break
            seconds = time.perf_counter() - start
            await run  # its idle timeout after the last job is not part of the figure
        return seconds
    finally:
        await bus.close()
