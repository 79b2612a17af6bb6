"""GET /api/sse/{job_id}: position while pending, steps with previews, exactly one terminal event."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from schemas import JobCanceled, terminal_message_id
from storage.object_store import S3Config
from tests.stack import KEY_BOB, auth, running_stack, served
from workers.backends.base import Backend


def parse_sse(body: str) -> list[dict[str, Any]]:
    events = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].strip() for line in block.splitlines() if line.startswith("data:")]
        if data:
            events.append(json.loads("\n".join(data)))
    return events


async def _stream(client: httpx.AsyncClient, job_id: str, headers: dict[str, str]) -> tuple[int, list[dict[str, Any]]]:
    async with client.stream("GET", f"/api/sse/{job_id}", headers=headers) as response:
        body = "".join([chunk async for chunk in response.aiter_text()])
        assert response.status_code != 200 or response.headers["content-type"].startswith("text/event-stream")
        return response.status_code, parse_sse(body) if response.status_code == 200 else [json.loads(body)]


@pytest.mark.parametrize("bus", ["nats", "memory"])
async def test_a_job_stream_shows_position_steps_previews_and_one_terminal_event(
    bus: str, request: pytest.FixtureRequest, storage_config: S3Config, tiny_backend: Backend, tmp_path: Any
) -> None:
    bus_url = str(request.getfixturevalue("nats_url")) if bus == "nats" else "memory://sse"
    database_url = f"sqlite:///{tmp_path}/rm.db"
    # The stream is read from a second ingress replica: it knows the job only from the bus and the read model.
    async with (
        running_stack(bus_url, storage_config, database_url, tiny_backend) as stack,
        served(stack.config) as replica,
    ):
        body = {"prompt": "p", "width": 64, "height": 64, "num_inference_steps": 12}
        first = (await stack.client.post("/api/generate", json=body, headers=auth())).json()["job_id"]
        second = (await stack.client.post("/api/generate", json=body, headers=auth())).json()["job_id"]

        status, events = await _stream(replica, second, auth())
        assert status == 200
        statuses = [event["status"] for event in events]
        assert statuses[0] == "pending" and events[0]["position"] in (0, 1), events[0]
        steps = [event["step"] for event in events if event["status"] == "processing" and event.get("step")]
        assert steps == sorted(steps) and steps[-1] == 12
        assert any(event.get("preview", "").startswith("data:image/jpeg;base64,") for event in events)
        terminal = [event for event in events if event["status"] in ("completed", "failed", "canceled")]
        assert len(terminal) == 1 and events[-1] is terminal[0]
        assert terminal[0]["status"] == "completed" and len(terminal[0]["images"]) == 1

        # Reconnecting after the end (Last-Event-ID) still gets the terminal event, and only it.
        _, again = await _stream(replica, second, {**auth(), "Last-Event-ID": f"{second}-queued"})
        assert [event["status"] for event in again] == ["completed"]
        await stack.wait_for_status(first, {"completed"})

        status, error = await _stream(replica, second, auth(KEY_BOB))
        assert status == 404 and error[0]["status"] == "error"


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The stream's events as they arrive (comments skipped)."""
    data: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            yield json.loads("\n".join(data))
            data = []


async def test_a_pending_stream_follows_its_position_and_ends_once(
    storage_config: S3Config, tiny_backend: Backend, tmp_path: Any
) -> None:
    # No worker: both jobs stay pending until their ends are announced on the bus, as a worker
    # dropping a canceled command would. The stream's positions come from the process's one timer.
    async with (
        running_stack(
            f"memory://{uuid.uuid4().hex}", storage_config, f"sqlite:///{tmp_path}/rm.db", tiny_backend, workers=0
        ) as stack,
        served(stack.config) as replica,
        asyncio.timeout(60),
    ):
        body = {"prompt": "p", "width": 64, "height": 64, "num_inference_steps": 2}
        ahead = (await stack.client.post("/api/generate", json=body, headers=auth())).json()["job_id"]
        mine = (await stack.client.post("/api/generate", json=body, headers=auth())).json()["job_id"]

        async with replica.stream("GET", f"/api/sse/{mine}", headers=auth()) as response:
            events = sse_events(response)
            assert await anext(events) == {"status": "pending", "position": 1}

            await stack.bus.publish_event(JobCanceled(job_id=ahead, reason="r", message_id=terminal_message_id(ahead)))
            assert await anext(events) == {"status": "pending", "position": 0}

            await stack.bus.publish_event(JobCanceled(job_id=mine, reason="r", message_id=terminal_message_id(mine)))
            rest = [event async for event in events]

        assert [event["status"] for event in rest] == ["canceled"]
        assert rest[0]["id"] == mine
