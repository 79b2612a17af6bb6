"""Seed 002 (Chutes image proxy): the README's requests as written, every documented field.

The README's curl sends no key, so this stack allows anonymous callers. Its example body asks
for 1024x1024 at 20 steps of "qwen-image" (the tiny stand-in: seconds on a CPU); the finished
task's ``file_path`` is fetched without a key and must be that 1024x1024 PNG.
"""

from __future__ import annotations

import asyncio
import io
import re
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

from storage.object_store import S3Config
from tests.seed_catalog import seed_catalog
from tests.stack import KEY_ALICE, Stack, assert_json_error, auth, running_stack, served
from workers.backends.base import Backend

README_BODY = {
    "prompt": "A detailed infographic of a coffee machine",
    "model": "qwen-image",
    "guidance_scale": 7.5,
    "width": 1024,
    "height": 1024,
    "num_inference_steps": 20,
}
CURL_BODY = '{"prompt": "A futuristic coffee machine"}'
TASK_FIELDS = {"id", "prompt", "status", "file_path", "error", "created_at", "updated_at"}
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
SQL_TIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
JSON = {"Content-Type": "application/json"}


def assert_task(task: dict[str, Any], *, status: str | None = None) -> None:
    assert set(task) == TASK_FIELDS, task
    assert UUID4.match(task["id"]), task
    assert task["status"] in ("pending", "processing", "completed", "failed"), task
    assert status is None or task["status"] == status, task
    assert SQL_TIME.match(task["created_at"]) and SQL_TIME.match(task["updated_at"]), task
    assert task["created_at"] <= task["updated_at"], task
    assert (task["error"] is not None) == (task["status"] == "failed"), task
    if task["status"] != "completed":
        assert task["file_path"] is None, task


async def wait_for(
    stack: Stack, task_id: str, statuses: set[str], timeout_s: float, client: Any = None
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        response = await (client or stack.client).get(f"/status/{task_id}")
        assert response.status_code == 200, response.text
        task: dict[str, Any] = response.json()
        assert_task(task)
        if task["status"] in statuses:
            return task
        for role in stack.tasks:
            if role.done() and role.exception():
                raise role.exception()  # type: ignore[misc]
        assert time.monotonic() < deadline, f"{task_id} still {task} after {timeout_s}s"
        await asyncio.sleep(0.1)


async def test_readme_examples_run_as_written(storage_config: S3Config, seed_backend: Backend, tmp_path: Any) -> None:
    database_url = f"sqlite:///{tmp_path}/rm.db"
    async with (
        running_stack(
            "memory://seed-chutes",
            storage_config,
            database_url,
            seed_backend,
            catalog=seed_catalog(),
            allow_anonymous=True,
        ) as stack,
        served(stack.config) as replica,
    ):
        # Everything over real HTTP in this event loop, where the memory bus and the worker live.
        client = replica
        # 1. Queue Image Generation: the README's body, then the curl one; one worker, so the second waits.
        queued = await client.post("/generate", json=README_BODY)
        assert queued.status_code == 200, queued.text
        big = queued.json()
        assert set(big) == {"id", "status", "message"} and UUID4.match(big["id"])
        assert big["status"] == "pending" and big["message"] == "Task queued successfully"
        curl = await client.post("/generate", content=CURL_BODY, headers=JSON)
        assert curl.status_code == 200, curl.text
        small = curl.json()
        assert small["status"] == "pending" and UUID4.match(small["id"]) and small["id"] != big["id"]
        # A third task, canceled (native API) while it waits: Chutes calls that "failed".
        doomed = (await client.post("/generate", json={"prompt": "never drawn"})).json()["id"]

        # 3. Filter by status: the curl task waits behind the 1024x1024 one.
        pending = await client.get("/status?status=pending")
        assert pending.status_code == 200 and isinstance(pending.json(), list)
        waiting = {task["id"]: task for task in pending.json()}
        assert small["id"] in waiting, pending.json()
        assert_task(waiting[small["id"]], status="pending")
        assert waiting[small["id"]]["prompt"] == "A futuristic coffee machine"
        # Over real HTTP: the in-process client would hold this event loop while cancel waits for the worker.
        canceled = await replica.post(f"/api/jobs/{doomed}/cancel")
        assert canceled.status_code == 200, canceled.text

        # 2. Check status: every field until completed; the image is at file_path, no key needed.
        done = await wait_for(stack, big["id"], {"completed", "failed"}, timeout_s=120, client=client)
        assert_task(done, status="completed")
        assert done["id"] == big["id"] and done["prompt"] == README_BODY["prompt"]
        url = urlsplit(done["file_path"])
        assert url.scheme == "http" and url.netloc and url.path.startswith("/files/"), done
        picture = await client.get(done["file_path"])
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
        assert picture.content.startswith(b"\x89PNG\r\n\x1a\n")
        assert Image.open(io.BytesIO(picture.content)).size == (1024, 1024)
        job = (await client.get(f"/api/jobs/{big['id']}")).json()
        assert (job["model"], job["num_inference_steps"], job["guidance_scale"]) == ("qwen-image", 20, 7.5)

        second = await wait_for(stack, small["id"], {"completed", "failed"}, timeout_s=60, client=client)
        assert_task(second, status="completed")
        assert Image.open(io.BytesIO((await client.get(second["file_path"])).content)).size == (64, 64)
        gone = await wait_for(stack, doomed, {"failed"}, timeout_s=60, client=client)
        assert gone["error"] and gone["file_path"] is None
        # The hex id works as well as the dashed one.
        assert (await client.get(f"/status/{uuid.UUID(big['id']).hex}")).json()["id"] == big["id"]

        # 3. All tasks, newest first; each status filter; pages.
        everything = await client.get("/status")
        assert [task["id"] for task in everything.json()] == [doomed, small["id"], big["id"]]
        assert everything.headers["x-total-count"] == "3"
        for task in everything.json():
            assert_task(task)
        by_status = {
            status: [task["id"] for task in (await client.get(f"/status?status={status}")).json()]
            for status in ("pending", "processing", "completed", "failed")
        }
        assert by_status == {"pending": [], "processing": [], "completed": [small["id"], big["id"]], "failed": [doomed]}
        pages = [(await client.get(f"/status?page={page}&limit=1")).json() for page in (1, 2, 3, 4)]
        assert [[task["id"] for task in page] for page in pages] == [[doomed], [small["id"]], [big["id"]], []]
        second_completed = (await client.get("/status?status=completed&page=2&limit=1")).json()
        assert [task["id"] for task in second_completed] == [big["id"]]

        # A keyed caller has tasks of its own; anonymous callers neither list nor read them.
        alices = (await client.post("/generate", json={"prompt": "alice"}, headers=auth())).json()["id"]
        assert [task["id"] for task in (await client.get("/status", headers=auth())).json()] == [alices]
        assert alices not in [task["id"] for task in (await client.get("/status")).json()]
        assert assert_json_error(await client.get(f"/status/{alices}"), 404)["status"] == "NOT_FOUND"
        await wait_for_keyed(stack, alices)


async def wait_for_keyed(stack: Stack, task_id: str) -> None:
    deadline = time.monotonic() + 60
    while (await stack.client.get(f"/status/{task_id}", headers=auth(KEY_ALICE))).json()["status"] not in (
        "completed",
        "failed",
    ):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


async def test_bad_input_is_a_4xx_json_error(storage_config: S3Config, seed_backend: Backend, tmp_path: Any) -> None:
    database_url = f"sqlite:///{tmp_path}/rm.db"
    async with running_stack(
        "memory://seed-chutes-bad",
        storage_config,
        database_url,
        seed_backend,
        catalog=seed_catalog(),
        allow_anonymous=True,
    ) as stack:
        client = stack.client
        bodies: list[Any] = [
            {},
            {"prompt": ""},
            {"prompt": "   "},
            {"prompt": "x" * 2001},
            {"prompt": 5},
            {"prompt": "p", "model": "no-such-model"},
            {"prompt": "p", "width": 1025},
            {"prompt": "p", "width": 2048, "height": 2048},
            {"prompt": "p", "num_inference_steps": 0},
            {"prompt": "p", "num_inference_steps": 51},
            {"prompt": "p", "guidance_scale": -1},
            {"prompt": "p", "num_images": 2},
            {"prompt": "p", "unknown": True},
            ["prompt"],
            "prompt",
            None,
        ]
        for body in bodies:
            assert_json_error(await client.post("/generate", json=body), 400)
        for raw in ("{", "", "not json"):
            assert_json_error(await client.post("/generate", content=raw, headers=JSON), 400)
        assert_json_error(await client.post("/generate", json={"prompt": "p"}, headers=auth("wrong-key")), 401)

        for query in ("status=bogus", "status=canceled", "page=0", "page=-1", "page=abc", "page=10000000",
                      "limit=0", "limit=1000", "limit=abc"):  # fmt: skip
            assert_json_error(await client.get(f"/status?{query}"), 400)
        assert_json_error(await client.get("/status", headers=auth("wrong-key")), 401)

        for task_id in (str(uuid.uuid4()), uuid.uuid4().hex, "not-an-id", "x" * 500):
            missing = assert_json_error(await client.get(f"/status/{task_id}"), 404)
            assert missing["status"] == "NOT_FOUND" and missing["error"], missing
        for url in ("/status/..%2F..%2Fetc%2Fpasswd", "/status/../../etc/passwd", "/status/a/b"):
            response = await client.get(url)
            assert 400 <= response.status_code < 500, (url, response.status_code, response.text)
            response.json()
        assert (await client.get("/status")).json() == []  # nothing above was queued
