"""Idempotent submits: an Idempotency-Key on every submit route, and PUT /api/jobs/{job_id} with a
client-chosen id. The same request again is the same job (run once); another request is 409."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from schemas import JobQueued, JobStarted, JobSucceeded
from storage.object_store import S3Config
from tests.stack import KEY_BOB, assert_json_error, auth, running_stack, served
from workers.backends.base import Backend

BODY = {"prompt": "a quiet harbour", "width": 64, "height": 64, "num_inference_steps": 2}


@pytest.fixture(params=["nats", "amqp"])
def broker_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


def _with_key(key: str, api_key: str | None = None) -> dict[str, str]:
    return {**(auth(api_key) if api_key else auth()), "Idempotency-Key": key}


def _refused(response: Any, status: int, words: str) -> None:
    """A JSON error with this status whose message says ``words``."""
    assert words in assert_json_error(response, status)["message"], response.text


async def _ran_once(stack: Any, job_id: str) -> None:
    job = await stack.wait_for_status(job_id, {"completed", "failed"})
    assert job["status"] == "completed", job
    await asyncio.sleep(0.5)  # a duplicate command would have started by now
    events = await stack.events_for(job_id)
    assert sum(isinstance(e, JobStarted) for e in events) == 1, events
    assert sum(isinstance(e, JobSucceeded) for e in events) == 1


async def test_the_same_key_and_body_is_one_job_and_another_body_is_409(
    broker_url: str, storage_config: S3Config, database_url: str, tiny_backend: Backend
) -> None:
    async with running_stack(broker_url, storage_config, database_url, tiny_backend) as stack:
        first = await stack.client.post("/api/generate", json=BODY, headers=_with_key("order-1"))
        again = await stack.client.post("/api/generate", json=BODY, headers=_with_key("order-1"))
        assert first.status_code == again.status_code == 202
        job_id = first.json()["job_id"]
        assert again.json()["job_id"] == job_id
        await _ran_once(stack, job_id)

        # After it finished, the same request still answers the same job, with its status now.
        late = await stack.client.post("/api/generate", json=BODY, headers=_with_key("order-1"))
        assert (late.json()["job_id"], late.json()["status"]) == (job_id, "completed")

        changed = await stack.client.post("/api/generate", json={**BODY, "prompt": "x"}, headers=_with_key("order-1"))
        _refused(changed, 409, "different request")

        # Keys are per API key: Bob's "order-1" is his own job.
        bob = await stack.client.post("/api/generate", json=BODY, headers=_with_key("order-1", KEY_BOB))
        assert bob.status_code == 202 and bob.json()["job_id"] != job_id
        # Only one JobQueued per job reached the log (the repeats published nothing).
        assert sum(isinstance(e, JobQueued) for e in await stack.events_for(job_id)) == 1


async def test_concurrent_submits_with_one_key_run_the_job_once(
    broker_url: str, storage_config: S3Config, database_url: str, tiny_backend: Backend
) -> None:
    async with running_stack(broker_url, storage_config, database_url, tiny_backend) as stack:
        async with served(stack.config) as replica_a, served(stack.config) as replica_b:
            replies = await asyncio.gather(
                *(
                    replica.post("/api/generate", json=BODY, headers=_with_key("burst"))
                    for replica in [replica_a, replica_b] * 6
                )
            )
        assert {reply.status_code for reply in replies} == {202}
        job_ids = {reply.json()["job_id"] for reply in replies}
        assert len(job_ids) == 1
        await _ran_once(stack, job_ids.pop())


async def test_put_with_a_client_chosen_id(
    broker_url: str, storage_config: S3Config, database_url: str, tiny_backend: Backend
) -> None:
    async with running_stack(broker_url, storage_config, database_url, tiny_backend) as stack:
        chosen = str(uuid.uuid4())  # dashed, as clients print them
        created = await stack.client.put(f"/api/jobs/{chosen}", json=BODY, headers=auth())
        assert created.status_code == 202, created.text
        job_id = created.json()["job_id"]
        assert job_id == chosen.replace("-", "")
        repeated = await stack.client.put(f"/api/jobs/{job_id}", json=BODY, headers=auth())
        assert repeated.status_code == 202 and repeated.json()["job_id"] == job_id
        await _ran_once(stack, job_id)
        assert (await stack.client.get(f"/api/jobs/{chosen}", headers=auth())).json()["status"] == "completed"

        _refused(
            await stack.client.put(f"/api/jobs/{job_id}", json={**BODY, "num_images": 2}, headers=auth()),
            409,
            "different request",
        )
        _refused(await stack.client.put(f"/api/jobs/{job_id}", json=BODY, headers=auth(KEY_BOB)), 409, "in use")
        _refused(await stack.client.put("/api/jobs/not-a-uuid", json=BODY, headers=auth()), 400, "UUID")
        too_long = "k" * 256
        _refused(
            await stack.client.post("/api/generate", json=BODY, headers=_with_key(too_long)), 400, "Idempotency-Key"
        )


async def test_seed_dialect_submit_routes_honour_the_key(
    storage_config: S3Config, database_url: str, seed_backend: Backend
) -> None:
    from tests.seed_catalog import seed_catalog

    async with running_stack("memory://idem-dialects", storage_config, database_url, seed_backend,
                             catalog=seed_catalog()) as stack:  # fmt: skip
        chutes = [
            await stack.client.post("/generate", json={"prompt": "a lake"}, headers=_with_key("c-1")) for _ in range(2)
        ]
        assert chutes[0].json()["id"] == chutes[1].json()["id"]
        weights = [
            await stack.client.get("/generateImage", params={"prompt": "a lake"}, headers=_with_key("w-1"))
            for _ in range(2)
        ]
        assert weights[0].json()["imageId"] == weights[1].json()["imageId"]
        await _ran_once(stack, weights[0].json()["imageId"])
