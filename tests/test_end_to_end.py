"""A job travels ingress → bus → worker → S3 → projector, over every bus and read model."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from PIL import Image

from bus import Bus
from schemas import Event, ImageStored, JobProgress, JobQueued, JobStarted, JobSucceeded
from storage.object_store import S3Config
from tests.stack import KEY_BOB, auth, fetch, running_stack
from workers.backends.base import Backend

FOX = {"prompt": "a red fox in snow", "num_images": 2, "width": 64, "height": 64, "num_inference_steps": 4}


@pytest.fixture(params=["nats", "amqp", "memory"])
def stack_bus_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://e2e"
    return str(request.getfixturevalue(f"{request.param}_url"))


@asynccontextmanager
async def watching(bus: Bus) -> AsyncIterator[list[Event]]:
    """Every event the bus shows a watcher while the block lasts, live-only ones included."""
    seen: list[Event] = []
    async with bus.watch_events() as live:

        async def collect() -> None:
            async for event in live:
                seen.append(event)

        collecting = asyncio.create_task(collect())
        try:
            yield seen
        finally:
            collecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collecting


async def test_job_completes_with_images_and_progress(
    stack_bus_url: str, storage_config: S3Config, database_url: str, tiny_backend: Backend
) -> None:
    async with (
        running_stack(stack_bus_url, storage_config, database_url, tiny_backend) as stack,
        watching(stack.bus) as watched,
    ):
        response = await stack.client.post("/api/generate", json=FOX, headers=auth())
        assert response.status_code == 202, response.text
        accepted = response.json()
        assert accepted["status"] == "pending"
        job_id = accepted["job_id"]

        # Read-your-writes: the very next read finds the job.
        first = await stack.client.get(f"/api/jobs/{job_id}", headers=auth())
        assert first.status_code == 200
        assert first.json()["status"] in {"pending", "processing", "completed"}

        job = await stack.wait_for_status(job_id, {"completed", "failed", "canceled"})
        assert job["status"] == "completed", job
        assert job["prompt"] == "a red fox in snow"
        assert job["model"] == stack.catalog.default
        assert job["progress"] == {"step": 4, "total_steps": 4}
        assert job["started_at"] and job["completed_at"]
        assert len(job["images"]) == 2

        for image in job["images"]:
            assert not image["expired"]
            download = await stack.client.get(f"/api/images/{image['id']}", headers=auth())
            assert download.status_code == 200
            assert download.headers["content-type"] == "image/png"
            assert Image.open(io.BytesIO(download.content)).size == (64, 64)
            # The presigned URL works without the API key, straight from the object store.
            direct = await fetch(image["url"])
            assert direct.status_code == 200 and direct.content == download.content
            as_jpeg = await stack.client.get(f"/api/images/{image['id']}?format=jpeg", headers=auth())
            assert as_jpeg.headers["content-type"] == "image/jpeg"
            assert Image.open(io.BytesIO(as_jpeg.content)).format == "JPEG"

        events = await stack.events_for(job_id)
        kinds = [type(event) for event in events]
        assert kinds[0] is JobQueued and kinds[1] is JobStarted
        # Steps are live data: watchers saw each, with a preview; the durable log holds none.
        assert not [event for event in events if isinstance(event, JobProgress)]
        progress = [event for event in watched if isinstance(event, JobProgress) and event.job_id == job_id]
        assert [event.step for event in progress] == [1, 2, 3, 4]
        assert any(event.preview for event in progress), "no preview was sent"
        assert sum(isinstance(e, ImageStored) for e in events) == 2
        assert sum(isinstance(e, JobSucceeded) for e in events) == 1


async def test_another_key_sees_nothing(storage_config: S3Config, tiny_backend: Backend, tmp_path: Any) -> None:
    async with running_stack("memory://owners", storage_config, f"sqlite:///{tmp_path}/rm.db", tiny_backend) as stack:
        job_id = (await stack.client.post("/api/generate", json=FOX, headers=auth())).json()["job_id"]
        job = await stack.wait_for_status(job_id, {"completed"})
        other = await stack.client.get(f"/api/jobs/{job_id}", headers=auth(KEY_BOB))
        assert other.status_code == 404
        assert other.json() == {"status": "error", "message": f"job {job_id} not found"}
        image_id = job["images"][0]["id"]
        assert (await stack.client.get(f"/api/images/{image_id}", headers=auth(KEY_BOB))).status_code == 404
        no_key = await stack.client.get(f"/api/jobs/{job_id}")
        assert no_key.status_code == 401 and no_key.json()["status"] == "error"
        bad_key = await stack.client.get(f"/api/jobs/{job_id}", headers=auth("nope"))
        assert bad_key.status_code == 401
        bearer = await stack.client.get(
            f"/api/jobs/{job_id}", headers={"Authorization": f"Bearer {auth()['X-API-Key']}"}
        )
        assert bearer.status_code == 200
