"""Roles stop promptly on NATS even when a stop lands as a fetch receives a message.

Regression: nats-py's fetch waits through ``asyncio.wait_for``, which on Python 3.11 can swallow a
cancel that coincides with an arriving message; the projector's reader then kept waiting and a
stopping projector hung for 30 s. Found in a test that drained a queue with a burst-mode worker and
then submitted once more before stopping.
"""

from __future__ import annotations

import time
from pathlib import Path

from bus import connect_bus
from storage.object_store import S3Config
from tests.stack import auth, running_stack
from workers.backends.base import Backend
from workers.runtime import Worker, WorkerOptions

BODY = {"prompt": "a stop", "width": 64, "height": 64, "num_inference_steps": 2}


async def test_the_stack_stops_within_seconds_right_after_an_event(
    nats_url: str, storage_config: S3Config, tiny_backend: Backend, tmp_path: Path
) -> None:
    database_url = f"sqlite:///{tmp_path}/rm.db"
    async with running_stack(nats_url, storage_config, database_url, tiny_backend, workers=0) as stack:
        assert (await stack.client.post("/api/generate", json=BODY, headers=auth())).status_code == 202
        worker_bus = await connect_bus(nats_url, stack.options)
        try:
            await Worker(worker_bus, stack.store, tiny_backend, WorkerOptions(worker_id="w")).run(idle_timeout_s=1.0)
        finally:
            await worker_bus.close()
        assert (await stack.client.post("/api/generate", json=BODY, headers=auth())).status_code == 202
        stopping = time.monotonic()
    # running_stack waits up to 30 s for its roles; the projector must not need more than a moment.
    assert time.monotonic() - stopping < 10
