"""The global queue bound: a queue holding max_queue_depth commands refuses submits with 429
instead of growing a backlog without end."""

from __future__ import annotations

import asyncio

import pytest

from bus import connect_bus
from ingress.config import QuotaLimits
from storage.object_store import S3Config
from tests.stack import assert_json_error, auth, running_stack
from workers.backends.base import Backend
from workers.runtime import Worker, WorkerOptions

BODY = {"prompt": "a queue", "width": 64, "height": 64, "num_inference_steps": 2}


@pytest.mark.parametrize("broker", ["nats", "amqp"])
async def test_a_full_queue_refuses_submits_with_429_until_it_drains(
    broker: str, request: pytest.FixtureRequest, storage_config: S3Config, database_url: str, tiny_backend: Backend
) -> None:
    bus_url = str(request.getfixturevalue(f"{broker}_url"))
    quota = QuotaLimits(active_jobs=100, max_queue_depth=3)
    # No worker: whatever is submitted stays queued.
    async with running_stack(bus_url, storage_config, database_url, tiny_backend, workers=0, quota=quota) as stack:
        for _ in range(3):
            assert (await stack.client.post("/api/generate", json=BODY, headers=auth())).status_code == 202
        refused = await stack.client.post("/api/generate", json=BODY, headers=auth())
        body = assert_json_error(refused, 429)
        assert "queue for diffusers is full (3 jobs waiting, limit 3)" in body["message"]
        assert refused.headers["Retry-After"] == "10"
        # A fresh reading from the broker (after the 1 s cache) agrees: still full.
        await asyncio.sleep(1.1)
        assert (await stack.client.post("/api/generate", json=BODY, headers=auth())).status_code == 429
        assert await stack.bus.command_backlog("diffusers") == 3

        # A worker drains the queue; a second later submits are welcome again.
        async def drain() -> None:
            worker_bus = await connect_bus(bus_url, stack.options)
            try:
                await Worker(worker_bus, stack.store, tiny_backend, WorkerOptions(worker_id="d")).run(idle_timeout_s=1)
            finally:
                await worker_bus.close()

        await drain()
        assert await stack.bus.command_backlog("diffusers") == 0
        await asyncio.sleep(1.1)
        accepted = await stack.client.post("/api/generate", json=BODY, headers=auth())
        assert accepted.status_code == 202
        await drain()
        assert (await stack.wait_for_status(accepted.json()["job_id"], {"completed"}))["status"] == "completed"
