"""The native API beyond submit/poll: cancel, the gallery, thumbnails, metadata, delete, quota, queue."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from PIL import Image

from imagebus.s3_server import S3Server
from ingress.config import EnrichConfig, QuotaLimits
from schemas import ImageDeleted, ImageStored, JobCanceled, JobFailed, JobStarted, JobSucceeded
from storage.object_store import ObjectMissing, S3Config
from tests.fixtures.s3 import remove_bucket
from tests.seed_catalog import seed_catalog
from tests.slow_backend import StepDelayBackend
from tests.stack import KEY_ADMIN, KEY_BOB, Stack, auth, running_stack, served
from workers.backends.base import Backend

TERMINAL = {"completed", "failed", "canceled"}
TERMINAL_EVENTS = (JobSucceeded, JobFailed, JobCanceled)


async def submit(stack: Stack, prompt: str, **fields: Any) -> str:
    body = {"prompt": prompt, "width": 64, "height": 64, **fields}
    response = await stack.client.post("/api/generate", json=body, headers=auth())
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


async def wait_for_step(stack: Stack, job_id: str, step: int, timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        body = (await stack.client.get(f"/api/jobs/{job_id}", headers=auth())).json()
        if body["progress"]["step"] >= step:
            return
        assert body["status"] not in TERMINAL, body
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.02)


async def stored_keys(stack: Stack, job_id: str) -> list[str]:
    far = datetime.now(UTC) + timedelta(days=2)
    return [obj.key for obj in await stack.store.list_expired(far) if obj.job_id == job_id]


@pytest.mark.parametrize("bus", ["nats", "memory"])
async def test_cancel_stops_a_running_job_between_steps_and_a_pending_one_before_it_starts(
    bus: str, request: pytest.FixtureRequest, storage_config: S3Config, tiny_backend: Backend, tmp_path: Any
) -> None:
    bus_url = str(request.getfixturevalue("nats_url")) if bus == "nats" else "memory://cancel"
    slow = StepDelayBackend(tiny_backend, 0.1)
    # Cancel goes through a real HTTP replica: it waits for the worker, which must keep running
    # meanwhile (the in-process test client would hold this event loop for the whole request).
    async with (
        running_stack(bus_url, storage_config, f"sqlite:///{tmp_path}/rm.db", slow) as stack,
        served(stack.config) as replica,
    ):
        running = await submit(stack, "a long one", num_inference_steps=40, num_images=2)
        waiting = await submit(stack, "behind it", num_inference_steps=40)
        await wait_for_step(stack, running, 2)

        queued = await replica.post(f"/api/jobs/{waiting}/cancel", headers=auth())
        assert queued.status_code == 200, queued.text
        answer = await replica.post(f"/api/jobs/{running}/cancel", headers=auth())
        assert answer.status_code == 200, answer.text
        assert answer.json()["job_id"] == running and answer.json()["status"] == "canceled", answer.json()

        for job_id in (running, waiting):
            body = await stack.wait_for_status(job_id, TERMINAL)
            assert body["status"] == "canceled" and body["images"] == [], body
        stopped = await stack.wait_for_status(running, TERMINAL)
        assert 2 <= stopped["progress"]["step"] < 40, stopped

        for job_id in (running, waiting):
            events = await stack.events_for(job_id)
            assert [type(e) for e in events if isinstance(e, TERMINAL_EVENTS)] == [JobCanceled]
            assert not [e for e in events if isinstance(e, ImageStored)], "partial images must not be stored"
            assert await stored_keys(stack, job_id) == []
        # The pending one never started: the worker dropped it on arrival.
        assert not [e for e in await stack.events_for(waiting) if isinstance(e, JobStarted)]

        # Ended jobs cannot be canceled; other owners' jobs do not exist.
        again = await stack.client.post(f"/api/jobs/{running}/cancel", headers=auth())
        assert again.status_code == 409 and again.json()["status"] == "error"
        foreign = await stack.client.post(f"/api/jobs/{running}/cancel", headers=auth(KEY_BOB))
        assert foreign.status_code == 404 and foreign.json()["status"] == "error"


async def test_gallery_search_thumbnails_metadata_signed_links_and_delete(
    storage_config: S3Config, tiny_backend: Backend, tmp_path: Any
) -> None:
    async with running_stack("memory://gallery", storage_config, f"sqlite:///{tmp_path}/rm.db", tiny_backend) as stack:
        fox = await submit(stack, "a red fox in snow", num_images=2, seed=7)
        whale = await submit(stack, "a blue whale", num_inference_steps=2)
        for job_id in (fox, whale):
            assert (await stack.wait_for_status(job_id, TERMINAL))["status"] == "completed"

        gallery = (await stack.client.get("/api/images", headers=auth())).json()
        assert gallery["total"] == 3 and gallery["page"] == 1 and gallery["has_more"] is False
        assert {item["job_id"] for item in gallery["images"]} == {fox, whale}
        page = (await stack.client.get("/api/images?page=2&limit=2", headers=auth())).json()
        assert len(page["images"]) == 1 and page["total"] == 3
        first_page = (await stack.client.get("/api/images?page=1&limit=2", headers=auth())).json()
        assert first_page["has_more"] is True
        found = (await stack.client.get("/api/images?search=FOX", headers=auth())).json()
        assert found["total"] == 2 and all(item["prompt"] == "a red fox in snow" for item in found["images"])
        by_model = (await stack.client.get("/api/images?search=tiny&model=tiny-sd", headers=auth())).json()
        assert by_model["total"] == 3
        for query in ("search=zebra", "model=sd-turbo", "search=%25", "search=_"):
            none = (await stack.client.get(f"/api/images?{query}", headers=auth())).json()
            assert none["total"] == 0, query
        assert (await stack.client.get("/api/images", headers=auth(KEY_BOB))).json()["total"] == 0

        item = next(i for i in found["images"] if i["seed"] == 7)
        image_id = item["id"]
        thumb = await stack.client.get(f"/api/thumbs/{image_id}.png", headers=auth())
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256
        by_link = await stack.client.get(item["file_url"])  # no key: the signature is the permission
        assert by_link.status_code == 200 and by_link.content.startswith(b"\x89PNG")
        thumb_link = await stack.client.get(item["thumb_url"])
        assert thumb_link.status_code == 200 and thumb_link.content.startswith(b"\xff\xd8")
        forged = await stack.client.get(item["file_url"].replace("sig=", "sig=0"))
        assert forged.status_code == 403 and forged.json()["status"] == "error"

        metadata = (await stack.client.get(f"/api/images/{image_id}/metadata", headers=auth())).json()
        assert metadata["prompt"] == "a red fox in snow" and metadata["model_id"] == "tiny-sd"
        assert metadata["seed"] == 7 and metadata["total_images"] == 2 and metadata["image_number"] == 1
        assert metadata["settings"]["num_inference_steps"] == 4 and metadata["generation_time"] > 0
        assert (await stack.client.get(f"/api/images/{image_id}/metadata", headers=auth(KEY_BOB))).status_code == 404

        object_key = next(
            e.object_key for e in await stack.events_for(fox) if isinstance(e, ImageStored) and e.image_id == image_id
        )
        deleted = await stack.client.delete(f"/api/images/{image_id}", headers=auth())
        assert deleted.json() == {"status": "success", "message": "Image deleted successfully"}
        # Gone at once: from the API, the gallery, the signed link, the bucket.
        assert (await stack.client.get(f"/api/images/{image_id}", headers=auth())).status_code == 404
        assert (await stack.client.get(item["file_url"])).status_code == 404
        assert (await stack.client.get("/api/images?search=fox", headers=auth())).json()["total"] == 1
        with pytest.raises(ObjectMissing):
            chunks = stack.store.get_stream(object_key)
            await anext(chunks)
        assert any(isinstance(e, ImageDeleted) and e.image_id == image_id for e in await stack.events_for(fox))
        assert (await stack.client.delete(f"/api/images/{image_id}", headers=auth())).status_code == 404


async def test_gallery_stream_pushes_the_callers_new_images_from_another_replica(
    storage_config: S3Config, tiny_backend: Backend, tmp_path: Any
) -> None:
    db = f"sqlite:///{tmp_path}/rm.db"
    async with (
        running_stack("memory://gallery-sse", storage_config, db, tiny_backend) as stack,
        served(stack.config) as replica,
        replica.stream("GET", "/api/sse/gallery", headers=auth()) as stream,
    ):
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.aiter_lines()
        assert await anext(lines) == ": connected"
        # Bob's image must not reach Alice's stream; hers must.
        await stack.client.post(
            "/api/generate", json={"prompt": "bob's", "width": 64, "height": 64}, headers=auth(KEY_BOB)
        )
        job_id = await submit(stack, "alice's")
        async with asyncio.timeout(60):
            while not (line := await anext(lines)).startswith("data:"):
                pass
        item = json.loads(line[5:])
        assert item["job_id"] == job_id and item["prompt"] == "alice's" and item["file_url"].startswith("/files/")


async def test_queue_stats_reset_of_stalled_jobs_quota_and_loras(
    storage_config: S3Config, tiny_backend: Backend, tmp_path: Any
) -> None:
    db = f"sqlite:///{tmp_path}/rm.db"
    # No worker: jobs stay pending, so the quota and the stalled-job reset can be watched.
    async with running_stack(
        "memory://queue",
        storage_config,
        db,
        tiny_backend,
        workers=0,
        catalog=seed_catalog(),
        quota=QuotaLimits(active_jobs=2, daily_images=5),
        stall_after_s=0.2,
    ) as stack:
        first = await submit(stack, "one", num_images=2)
        await submit(stack, "two", num_images=2, model="sd-3.5")
        refused = await stack.client.post("/api/generate", json={"prompt": "three"}, headers=auth())
        assert refused.status_code == 429 and refused.json()["status"] == "error"
        assert "Retry-After" in refused.headers
        quota = (await stack.client.get("/api/quota", headers=auth())).json()
        assert quota == {
            "usage": {"active_jobs": 2, "daily_images": 4},
            "limits": {"active_jobs": 2, "daily_images": 5},
            "remaining": {"active_jobs": 0, "daily_images": 1},
            "upstream": [],
        }
        # Bob has his own quota.
        assert (
            await stack.client.post("/api/generate", json={"prompt": "b"}, headers=auth(KEY_BOB))
        ).status_code == 202

        basic = (await stack.client.get("/api/queue", headers=auth())).json()
        assert basic["pending"] == 3 and basic["queue_size"] == 3 and basic["total"] == 3
        assert "recent_24h" not in basic or basic["recent_24h"] is None
        detailed = (await stack.client.get("/api/queue?detailed=true", headers=auth())).json()
        assert detailed["recent_24h"]["pending"] == 3 and detailed["failure_rate"] == 0.0
        assert detailed["models"]["sd-3.5"]["pending"] == 1 and detailed["models"]["tiny-sd"]["pending"] == 2

        # A job a worker started and then went quiet on: admin-only reset puts it back.
        await stack.bus.publish_event(JobStarted(job_id=first, worker_id="gone", attempt=1))
        await stack.wait_for_status(first, {"processing"}, timeout_s=10)
        await asyncio.sleep(0.3)
        forbidden = await stack.client.post("/api/reset_queue", headers=auth())
        assert forbidden.status_code == 403 and forbidden.json()["status"] == "error"
        reset = (await stack.client.post("/api/reset_queue", headers=auth(KEY_ADMIN))).json()
        assert reset == {"status": "success", "reset_count": 1, "message": "Reset 1 stalled jobs to pending status"}
        await stack.wait_for_status(first, {"pending"}, timeout_s=10)
        assert await stack.bus.command_backlog("diffusers") == 4  # three originals and the re-published one

        found = (await stack.client.get("/api/loras?query=portrait")).json()["loras"]
        assert [lora["id"] for lora in found] == ["civitai_1963644"]
        assert found[0]["name"] == "Pixel Portrait" and found[0]["trigger_words"] == ["pixel portrait"]
        assert (await stack.client.get("/api/loras?query=nothing-like-it")).json() == {"loras": []}
        info = (await stack.client.get("/api/info")).json()
        assert [lora["id"] for lora in info["models"]["tiny-sd"]["loras"]] == ["civitai_1963644"]
        assert (
            info["models"]["flux-1"]["loras"] == []
            and "loras" not in info["models"]["flux-1"]["parameters"]["properties"]
        )
        unknown = await stack.client.post(
            "/api/generate", json={"prompt": "x", "loras": [{"id": "nope"}]}, headers=auth(KEY_BOB)
        )
        assert unknown.status_code == 400 and "unknown LoRA" in unknown.json()["message"]


class _FakeChat(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that answers once well and then with a 500."""

    calls: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeChat.calls.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if len(_FakeChat.calls) > 1:
            self.send_error(500, "overloaded")
            return
        answer = {"choices": [{"message": {"role": "assistant", "content": "  a castle, LLM style  "}}]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_chat() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _FakeChat)
    _FakeChat.calls = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


async def test_enrich_uses_templates_or_a_configured_chat_endpoint(
    storage_config: S3Config, tiny_backend: Backend, tmp_path: Any, fake_chat: str
) -> None:
    db = f"sqlite:///{tmp_path}/rm.db"
    async with running_stack("memory://enrich", storage_config, db, tiny_backend, workers=0) as stack:
        for style in ("cyberpunk", "anime", "realistic", "fantasy", "sci-fi", "enhance"):
            body = (
                await stack.client.post("/api/enrich", json={"prompt": "a castle", "style": style}, headers=auth())
            ).json()
            assert body["style"] == style and body["source"] == "template" and body["original_prompt"] == "a castle"
            assert body["enriched_prompt"].startswith("a castle,") and len(body["enriched_prompt"]) > 40
        default = (await stack.client.post("/api/enrich", json={"prompt": "a castle"}, headers=auth())).json()
        assert default["style"] == "cyberpunk"
        bad = await stack.client.post("/api/enrich", json={"prompt": "a castle", "style": "baroque"}, headers=auth())
        assert bad.status_code == 400 and "available styles" in bad.json()["message"]

    chat = EnrichConfig(url=fake_chat, model="m", api_key="sk-test")
    async with running_stack("memory://enrich2", storage_config, db, tiny_backend, workers=0, enrich=chat) as stack:
        llm = (
            await stack.client.post("/api/enrich", json={"prompt": "a castle", "style": "anime"}, headers=auth())
        ).json()
        assert llm == {
            "original_prompt": "a castle",
            "enriched_prompt": "a castle, LLM style",
            "style": "anime",
            "source": "llm",
        }
        call = _FakeChat.calls[0]
        assert (
            call["path"] == "/v1/chat/completions" and call["auth"] == "Bearer sk-test" and call["body"]["model"] == "m"
        )
        fallback = (
            await stack.client.post("/api/enrich", json={"prompt": "a castle", "style": "anime"}, headers=auth())
        ).json()
        assert fallback["source"] == "template"


BAD_REQUESTS = [
    ("GET", "/api/jobs/not-a-job", None, 404),
    ("GET", "/api/jobs?page=0", None, 400),
    ("GET", "/api/jobs?page=1000000000000000000", None, 400),
    ("GET", "/api/images?page=99999999999999999999", None, 400),
    ("GET", "/api/jobs?limit=1000", None, 400),
    ("GET", "/api/jobs?status=bogus", None, 400),
    ("POST", "/api/jobs/0123/cancel", None, 404),
    ("GET", "/api/images?page=0", None, 400),
    ("GET", "/api/images?limit=1000", None, 400),
    ("GET", "/api/images?limit=abc", None, 400),
    ("GET", "/api/images/..%2F..%2Fetc%2Fpasswd", None, 404),
    ("GET", "/api/images/%2E%2E", None, 404),
    ("GET", "/api/images/0123456789abcdef0123456789abcdef.exe", None, 404),
    ("GET", "/api/thumbs/..%2Fsecret.png", None, 404),
    ("GET", "/api/images/0123456789abcdef0123456789abcdef/metadata", None, 404),
    ("DELETE", "/api/images/..%2F..%2Fx", None, 404),
    ("GET", "/files/0123456789abcdef0123456789abcdef.png?sig=nope", None, 403),
    ("GET", "/files/..%2F..%2Fetc%2Fpasswd?sig=x", None, 404),
    ("GET", "/api/sse/not-a-job", None, 404),
    ("POST", "/api/enrich", {"prompt": ""}, 400),
    ("POST", "/api/enrich", {"prompt": "x", "style": "unknown"}, 400),
    ("POST", "/api/generate", {"prompt": "x", "settings": {"num_images": 99}}, 400),
    ("POST", "/api/generate", {"prompt": "x", "model": "tiny-sd", "model_id": "sd-turbo"}, 400),
    ("POST", "/api/generate", {"prompt": "x", "loras": [{"id": "a", "weight": "heavy"}]}, 400),
    ("POST", "/api/generate", {"prompt": "x", "loras": [{"id": "a"}]}, 400),  # tiny-sd takes no LoRA
    ("POST", "/api/reset_queue", None, 403),
    ("GET", "/api/loras?query=" + "x" * 300, None, 400),
]


@pytest.fixture(scope="module")
async def idle_stack(
    s3_server: S3Server, tiny_backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """One stack for the whole table, with no worker: nothing here may ever be queued."""
    db = f"sqlite:///{tmp_path_factory.mktemp('bad')}/rm.db"
    s3 = S3Config(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, bucket="test-bad-input")
    async with running_stack("memory://bad-input", s3, db, tiny_backend, workers=0) as stack:
        yield stack
    remove_bucket(s3)


@pytest.mark.parametrize(("method", "path", "body", "status"), BAD_REQUESTS)
async def test_bad_input_on_every_native_route_is_a_4xx_json_error(
    method: str, path: str, body: dict[str, Any] | None, status: int, idle_stack: Stack
) -> None:
    response = await idle_stack.client.request(method, path, json=body, headers=auth())
    assert response.status_code == status, (path, response.text)
    assert response.json()["status"] == "error" and response.json()["message"]
