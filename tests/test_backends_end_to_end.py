"""Issue-4 backends through the whole stack (HTTP → NATS → worker → S3 → projector): a remote API
worker against the fake image API, LoRAs by API, dynamic batching, and pools pinned to models."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imagebus.catalog import load_catalog
from imagebus.lora_catalog import merge_loras, scan_lora_folder
from schemas import Catalog, ModelSpec, RemoteEndpoint
from storage.object_store import S3Config
from tests.fakes.image_api import FakeImageApi
from tests.lora_files import write_tiny_lora
from tests.slow_backend import SharedBackend
from tests.stack import auth, running_stack
from workers.backends.base import Backend, BackendImage, JobRequest, SiteQuota
from workers.backends.diffusers import DiffusersBackend, DiffusersOptions
from workers.backends.remote import RemoteBackend

TOKEN = "sk-test-token"


@pytest.fixture(scope="module")
async def image_api() -> AsyncIterator[FakeImageApi]:
    async with FakeImageApi(tokens=(TOKEN,), latency_s=0.2).running() as served:
        yield served


def _remote_catalog(api: FakeImageApi) -> Catalog:
    shipped = load_catalog()
    endpoint = RemoteEndpoint(id="fake-openai", kind="openai", url=api.openai_url, concurrency=4, timeout_s=10)
    remote = ModelSpec(id="fake-dalle", description="fake", backend="remote", source="dall-e-2",
                       endpoint="fake-openai", max_images=4, supports_negative_prompt=False)  # fmt: skip
    return shipped.model_copy(
        update={
            "models": {**shipped.models, "fake-dalle": remote},
            "endpoints": {**shipped.endpoints, "fake-openai": endpoint},
        }
    )


async def _submit(stack: Any, body: dict[str, Any]) -> str:
    response = await stack.client.post("/api/generate", json=body, headers=auth())
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


async def test_remote_jobs_run_through_the_worker_at_the_endpoints_cap(
    nats_url: str, storage_config: S3Config, database_url: str, tiny_backend: Backend, image_api: FakeImageApi
) -> None:
    image_api.reset()
    catalog = _remote_catalog(image_api)
    remote = RemoteBackend(catalog, {"fake-openai": TOKEN})
    async with running_stack(nats_url, storage_config, database_url, tiny_backend, catalog=catalog,
                             extra_workers=[(remote, None)]) as stack:  # fmt: skip
        bodies = [{"model": "fake-dalle", "prompt": f"a fox number {i}", "width": 256, "height": 256} for i in range(8)]
        job_ids = await asyncio.gather(*(_submit(stack, body) for body in bodies))
        jobs = await asyncio.gather(*(stack.wait_for_status(job_id, {"completed", "failed"}) for job_id in job_ids))

        assert [job["status"] for job in jobs] == ["completed"] * 8, jobs
        # Several jobs were in flight at once, never more than the endpoint allows.
        assert 1 < image_api.max_in_flight <= 4
        image = jobs[0]["images"][0]
        download = await stack.client.get(f"/api/images/{image['id']}", headers=auth())
        assert Image.open(io.BytesIO(download.content)).size == (256, 256)


async def test_a_lora_from_the_lora_folder_is_listed_applied_and_named_in_the_job(
    nats_url: str, storage_config: S3Config, database_url: str, tiny_backend: Backend, tmp_path: Path
) -> None:
    write_tiny_lora("tiny-sd", tmp_path / "neon-style.safetensors")
    (tmp_path / "neon-style.json").write_text('{"name": "Neon Style", "trigger_words": ["neon glow"]}')
    catalog = merge_loras(load_catalog(), scan_lora_folder(tmp_path).loras)
    backend = DiffusersBackend(catalog, DiffusersOptions(device="cpu"))
    async with running_stack(nats_url, storage_config, database_url, backend, catalog=catalog) as stack:
        listed = (await stack.client.get("/api/loras", params={"query": "neon"}, headers=auth())).json()
        assert [lora["id"] for lora in listed["loras"]] == ["neon-style"], listed

        base = {"prompt": "a harbour", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 3}
        plain = await _submit(stack, {**base, "prompt": "neon glow, a harbour"})
        styled = await _submit(stack, {**base, "loras": [{"id": "neon-style", "weight": 1.0}]})
        plain_job = await stack.wait_for_status(plain, {"completed", "failed"})
        styled_job = await stack.wait_for_status(styled, {"completed", "failed"})
        assert styled_job["status"] == "completed", styled_job
        assert styled_job["loras"] == [{"id": "neon-style", "weight": 1.0, "trigger_weight": 1.0}]

        async def pixels(job: dict[str, Any]) -> bytes:
            image = job["images"][0]
            return (await stack.client.get(f"/api/images/{image['id']}", headers=auth())).content

        assert await pixels(plain_job) != await pixels(styled_job)


class RecordingBackend(SharedBackend):
    """Notes each call's job count: the only way to see from outside that jobs were batched."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.call_sizes: list[int] = []

    async def generate(self, job: JobRequest) -> Sequence[BackendImage]:
        self.call_sizes.append(1)
        return await super().generate(job)

    async def generate_batch(self, jobs: list[JobRequest]) -> Sequence[Sequence[BackendImage] | BaseException]:
        self.call_sizes.append(len(jobs))
        return await super().generate_batch(jobs)


async def test_jobs_submitted_together_are_batched_and_each_completes_on_its_own(
    nats_url: str, storage_config: S3Config, database_url: str
) -> None:
    catalog = load_catalog()
    backend = RecordingBackend(DiffusersBackend(catalog, DiffusersOptions(device="cpu", max_batch_images=4)))
    async with running_stack(nats_url, storage_config, database_url, backend, catalog=catalog) as stack:
        body = {"width": 64, "height": 64, "num_inference_steps": 3}
        job_ids = await asyncio.gather(*(_submit(stack, {**body, "prompt": f"scene {i}", "seed": i}) for i in range(6)))
        jobs = await asyncio.gather(*(stack.wait_for_status(job_id, {"completed", "failed"}) for job_id in job_ids))

        assert [job["status"] for job in jobs] == ["completed"] * 6
        assert [job["images"][0]["seed"] for job in jobs] == list(range(6))
        assert sum(backend.call_sizes) == 6 and max(backend.call_sizes) > 1, backend.call_sizes


async def test_a_model_in_a_pool_runs_only_on_that_pools_workers(
    nats_url: str, storage_config: S3Config, database_url: str, tiny_backend: Backend
) -> None:
    shipped = load_catalog()
    pooled = shipped.models["tiny-sd"].model_copy(update={"id": "tiny-pooled", "pool": "diffusers-tiny"})
    catalog = shipped.model_copy(update={"models": {**shipped.models, "tiny-pooled": pooled}})
    pool_backend = DiffusersBackend(catalog, DiffusersOptions(device="cpu", models=["tiny-pooled"]))
    body = {"model": "tiny-pooled", "prompt": "pooled", "width": 64, "height": 64, "num_inference_steps": 2}

    # Only the shared-queue worker runs: the pooled job waits.
    async with running_stack(nats_url, storage_config, database_url, tiny_backend, catalog=catalog) as stack:
        waiting = await _submit(stack, body)
        await asyncio.sleep(1.5)
        assert (await stack.client.get(f"/api/jobs/{waiting}", headers=auth())).json()["status"] == "pending"
        assert await stack.bus.command_backlog("diffusers-tiny") >= 1

    async with running_stack(nats_url, storage_config, database_url, tiny_backend, catalog=catalog,
                             extra_workers=[(pool_backend, "diffusers-tiny")]) as stack:  # fmt: skip
        job_id = await _submit(stack, body)
        job = await stack.wait_for_status(job_id, {"completed", "failed"})
        assert job["status"] == "completed", job
        events = await stack.events_for(job_id)
        assert [e.worker_id for e in events if e.type == "JobStarted"] == ["extra-worker-0"]


class QuotaReadingBackend(SharedBackend):
    """A backend whose outside service reports a quota, as the browser backend reads a site's."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.used = 0

    async def generate(self, job: JobRequest) -> Sequence[BackendImage]:
        images = await super().generate(job)
        self.used += len(images)
        return images

    async def site_quota(self) -> SiteQuota | None:
        return SiteQuota(source="example.site", used=self.used, limit=50, remaining=50 - self.used)


async def test_an_upstream_quota_read_by_a_worker_shows_in_both_quota_routes(
    nats_url: str, storage_config: S3Config, database_url: str, tiny_backend: Backend
) -> None:
    backend = QuotaReadingBackend(tiny_backend)
    async with running_stack(nats_url, storage_config, database_url, backend) as stack:
        job_id = await _submit(stack, {"prompt": "q", "width": 64, "height": 64, "num_inference_steps": 2})
        await stack.wait_for_status(job_id, {"completed"})
        for _ in range(100):
            quota = (await stack.client.get("/api/quota", headers=auth())).json()
            if quota["upstream"]:
                break
            await asyncio.sleep(0.05)
        assert [(q["source"], q["used"], q["limit"], q["remaining"]) for q in quota["upstream"]] == [
            ("example.site", 1, 50, 49)
        ]
        weights = (await stack.client.get("/quota", headers=auth())).json()
        assert weights["upstream"][0]["remaining"] == 49
