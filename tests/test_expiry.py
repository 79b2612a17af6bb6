"""No image can be fetched after its expires_at: not by presigned URL, not through the API."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from storage.object_store import ObjectMissing, S3Config
from storage.reaper import reap_expired
from tests.stack import auth, fetch, running_stack
from workers.backends.base import Backend


async def test_image_unreachable_after_expiry(storage_config: S3Config, tiny_backend: Backend, tmp_path: Any) -> None:
    async with running_stack(
        "memory://expiry", storage_config, f"sqlite:///{tmp_path}/rm.db", tiny_backend, image_ttl_s=3.0
    ) as stack:
        body = {"prompt": "short lived", "width": 64, "height": 64, "num_inference_steps": 2}
        job_id = (await stack.client.post("/api/generate", json=body, headers=auth())).json()["job_id"]
        job = await stack.wait_for_status(job_id, {"completed"})
        image = job["images"][0]
        assert (await fetch(image["url"])).status_code == 200
        assert (await stack.client.get(f"/api/images/{image['id']}", headers=auth())).status_code == 200

        expires_at = datetime.fromisoformat(image["expires_at"])
        await asyncio.sleep(max(0.0, (expires_at - datetime.now(UTC)).total_seconds()) + 0.2)

        # Past expires_at, before any reaper ran: both ways in are closed already.
        assert (await fetch(image["url"])).status_code == 403
        gone = await stack.client.get(f"/api/images/{image['id']}", headers=auth())
        assert gone.status_code == 410 and gone.json()["status"] == "error"
        view = (await stack.client.get(f"/api/jobs/{job_id}", headers=auth())).json()
        assert view["images"][0]["expired"] is True and view["images"][0]["url"] is None

        # The reaper deletes the object and the projector records ImageExpired.
        assert await reap_expired(stack.store, stack.bus) >= 1
        for _ in range(100):
            view = (await stack.client.get(f"/api/jobs/{job_id}", headers=auth())).json()
            if all(img["expired"] for img in view["images"]):
                break
            await asyncio.sleep(0.05)
        object_key = ""
        async with stack.bus.read_events(idle_timeout_s=0.3) as events:
            async for logged in events:
                if logged.event.type == "ImageExpired" and logged.event.job_id == job_id:
                    object_key = logged.event.object_key
        assert object_key
        try:
            async for _ in stack.store.get_stream(object_key):
                raise AssertionError("expired object still stored")
        except ObjectMissing:
            pass
