"""The example subscriber (examples/event_subscriber.py), run as its own process with nothing but
the broker client, receives JobSucceeded for a job submitted through the API, on NATS and RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from storage.object_store import S3Config
from tests.stack import auth, running_stack
from workers.backends.base import Backend

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "event_subscriber.py"


async def _line(stream: asyncio.StreamReader | None, timeout_s: float) -> str:
    assert stream is not None
    line = await asyncio.wait_for(stream.readline(), timeout_s)
    assert line, "the subscriber exited early"
    return line.decode()


@pytest.mark.parametrize("broker", ["nats", "amqp"])
async def test_the_example_subscriber_receives_job_succeeded(
    broker: str, request: pytest.FixtureRequest, storage_config: S3Config, tiny_backend: Backend, tmp_path: Path
) -> None:
    bus_url = str(request.getfixturevalue(f"{broker}_url"))
    async with running_stack(bus_url, storage_config, f"sqlite:///{tmp_path}/rm.db", tiny_backend) as stack:
        subscriber = await asyncio.create_subprocess_exec(
            *[sys.executable, str(EXAMPLE), "--bus", bus_url, "--namespace", stack.options.namespace, "--count", "1"],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert (await _line(subscriber.stderr, 30)).strip() == "subscribed"
            body = {"prompt": "a lighthouse", "width": 64, "height": 64, "num_inference_steps": 2, "num_images": 2}
            job_id = (await stack.client.post("/api/generate", json=body, headers=auth())).json()["job_id"]
            event = json.loads(await _line(subscriber.stdout, 120))
            job = await stack.wait_for_status(job_id, {"completed"})
            assert event["type"] == "JobSucceeded" and event["job_id"] == job_id, event
            assert event["image_ids"] == [image["id"] for image in job["images"]]
            assert await asyncio.wait_for(subscriber.wait(), 10) == 0
        finally:
            if subscriber.returncode is None:
                subscriber.kill()
                await subscriber.wait()
