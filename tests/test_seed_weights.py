"""Seeds 000/001 (weights.gg unofficial API): every documented route and field, with its status words.

The README's requests run as written against a whole stack: ``/health``, ``/search-loras``,
``/generateImage`` (with and without ``loraName``), ``/status/:imageId`` and ``/quota``,
with the key in ``x-api-key``. Bad input on each route is a 4xx JSON error, never a 500.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

from ingress.dialects.weights import status_word
from schemas import JobStatus
from storage.object_store import S3Config
from tests.seed_catalog import seed_catalog
from tests.stack import KEY_ALICE, KEY_BOB, Stack, assert_json_error, running_stack
from workers.backends.base import Backend

WORDS = ("QUEUED", "STARTING", "PENDING", "COMPLETED")
STATUS_FIELDS = {"status", "prompt", "startTime", "lastModifiedDate", "error"}

# The README's /quota example: which keys each of usage, limits and remaining has.
QUOTA_USAGE_KEYS = {
    "QUEUED_IMAGE_JOBS", "QUEUED_COVER_JOBS", "QUEUED_SONG_JOBS", "QUEUED_VIDEO_JOBS",
    "QUEUED_VOICE_TRAINING_JOBS", "QUEUED_IMAGE_TRAINING_JOBS", "QUEUED_VIDEO_TRAINING_JOBS",
    "DAILY_IMAGE_CREATIONS", "DAILY_COVER_CREATIONS", "DAILY_VIDEO_CREATIONS", "DAILY_IMAGE_EDITS",
    "DAILY_SONG_CREATIONS", "DAILY_FAST_IMAGE_TRAINING_JOBS", "VOYAGES_DAILY_IMAGE_CREATIONS",
    "WEEKLY_IMAGE_TRAINING_JOBS", "WEEKLY_VIDEO_TRAINING_JOBS", "VOYAGES_WEEKLY_IMAGE_TRAINING_JOBS",
    "WEEKLY_VOICE_TRAINING_JOBS",
}  # fmt: skip
QUOTA_LIMIT_KEYS = QUOTA_USAGE_KEYS | {"CHAT_CONVERSATIONS", "CHAT_MESSAGES", "COVER_AUDIO_LENGTH_SECONDS"}


def key(api_key: str = KEY_ALICE) -> dict[str, str]:
    return {"x-api-key": api_key}


def path_of(url: str) -> str:
    parts = urlsplit(url)
    assert parts.scheme in ("http", "https") and parts.netloc, url
    return parts.path + (f"?{parts.query}" if parts.query else "")


def parse_time(value: str) -> datetime:
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert moment.tzinfo is not None, value
    return moment


async def follow(stack: Stack, image_id: str, until: set[str], timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Poll ``/status/:imageId`` as the README's clients do; every answer, the last one terminal."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while True:
        response = await stack.client.get(f"/status/{image_id}", headers=key())
        assert response.status_code == 200, response.text
        seen.append(response.json())
        if seen[-1]["status"] in until:
            return seen
        assert time.monotonic() < deadline, f"{image_id} still {seen[-1]} after {timeout_s}s"
        await asyncio.sleep(0.02)


def test_status_words_follow_weights_gg() -> None:
    assert status_word(JobStatus.PENDING, 0) == "QUEUED"
    assert status_word(JobStatus.PROCESSING, 0) == "STARTING"
    assert status_word(JobStatus.PROCESSING, 3) == "PENDING"  # rendering, previews arriving
    assert status_word(JobStatus.COMPLETED, 4) == "COMPLETED"
    assert status_word(JobStatus.FAILED, 1) == "FAILED"
    assert status_word(JobStatus.CANCELED, 2) == "FAILED"


async def test_readme_examples_run_as_written(storage_config: S3Config, seed_backend: Backend, tmp_path: Any) -> None:
    database_url = f"sqlite:///{tmp_path}/rm.db"
    async with running_stack(
        "memory://seed-weights", storage_config, database_url, seed_backend, catalog=seed_catalog()
    ) as stack:
        client = stack.client
        health = await client.get("/health", headers=key())
        assert health.status_code == 200 and isinstance(health.json()["status"], str)

        # Search LoRAs: a JSON array of {name, image, tags} (plus id and trigger words).
        for query in ("pixel", "Pixel%20Portrait", "portrait", "civitai_1963644"):
            found = await client.get(f"/search-loras?query={query}", headers=key())
            assert found.status_code == 200, found.text
            loras = found.json()
            assert isinstance(loras, list) and len(loras) == 1, loras
            lora = loras[0]
            assert lora["name"] == "Pixel Portrait" and lora["id"] == "civitai_1963644"
            assert lora["image"] == "https://example.invalid/civitai_1963644.png"
            assert lora["tags"] == ["portrait", "pixel art"] and lora["trigger_words"] == ["pixel portrait"]
        assert (await client.get("/search-loras?query=no-such-lora", headers=key())).json() == []

        # Quota before any job: every key of the README's example, figures that add up.
        quota = (await client.get("/quota", headers=key())).json()
        assert quota["isPremium"] is True
        assert set(quota["usage"]) >= QUOTA_USAGE_KEYS
        assert set(quota["limits"]) >= QUOTA_LIMIT_KEYS and set(quota["remaining"]) >= QUOTA_LIMIT_KEYS
        assert quota["limits"]["QUEUED_IMAGE_JOBS"] == 40 and quota["limits"]["DAILY_IMAGE_CREATIONS"] == 1500
        assert quota["usage"]["DAILY_IMAGE_CREATIONS"] == 0 and quota["remaining"]["DAILY_IMAGE_CREATIONS"] == 1500

        # Generate Image: ?prompt= URL-encoded; the answer's URLs work as given.
        prompt = "a lighthouse on a cliff at dusk"
        generated = await client.get(f"/generateImage?prompt={prompt.replace(' ', '%20')}", headers=key())
        assert generated.status_code == 200, generated.text
        body = generated.json()
        assert set(body) == {"success", "imageId", "imageUrl", "statusUrl"}
        assert body["success"] is True and re.fullmatch(r"[0-9a-f]{32}", body["imageId"])
        image_id = body["imageId"]
        assert body["statusUrl"] == f"/status/{image_id}"  # relative, as weights.gg answers
        assert path_of(body["imageUrl"]).startswith("/files/")

        # Image Status: every documented field, the words in order, lastModifiedDate moving on.
        seen = await follow(stack, image_id, {"COMPLETED", "FAILED"})
        final = seen[-1]
        assert set(final) >= STATUS_FIELDS
        assert final["status"] == "COMPLETED" and final["error"] is None, final
        assert final["prompt"] == prompt and final["imageId"] == image_id
        words = [answer["status"] for answer in seen]
        assert all(word in WORDS for word in words), words
        assert [WORDS.index(w) for w in words] == sorted(WORDS.index(w) for w in words), words
        start, modified = parse_time(final["startTime"]), parse_time(final["lastModifiedDate"])
        assert start <= modified
        assert parse_time(seen[0]["lastModifiedDate"]) <= modified
        assert len(seen) == 1 or seen[0]["lastModifiedDate"] != final["lastModifiedDate"]
        assert path_of(final["imageUrl"]) == path_of(body["imageUrl"])

        # imageUrl needs no key (a signed link) and is the 64x64 PNG of the default model.
        picture = await client.get(path_of(body["imageUrl"]))
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(picture.content)).size == (64, 64)
        # The status URL works exactly as returned, and the dashed UUID form too.
        assert (await client.get(body["statusUrl"], headers=key())).json()["status"] == "COMPLETED"
        dashed = str(uuid.UUID(hex=image_id))
        assert (await client.get(f"/status/{dashed}", headers=key())).json()["imageId"] == image_id

        # loraName by name or id: accepted, and the worker that cannot load it fails the job saying so.
        for lora_name in ("Pixel Portrait", "civitai_1963644"):
            response = await client.get(
                "/generateImage", params={"prompt": "a knight, pixel portrait", "loraName": lora_name}, headers=key()
            )
            assert response.status_code == 200, response.text
            assert response.json()["success"] is True
            failed = (await follow(stack, response.json()["imageId"], {"COMPLETED", "FAILED"}))[-1]
            assert failed["status"] == "FAILED", failed
            assert "civitai_1963644" in failed["error"] and "LoRA" in failed["error"], failed
            assert failed["imageUrl"] is None
        job = (await client.get(f"/api/jobs/{response.json()['imageId']}", headers=key())).json()
        assert job["loras"] == [{"id": "civitai_1963644", "weight": 1.0, "trigger_weight": 1.0}]

        # Quota after: three images asked for today, none queued any more.
        quota = (await client.get("/quota", headers=key())).json()
        assert quota["usage"]["DAILY_IMAGE_CREATIONS"] == 3 and quota["usage"]["QUEUED_IMAGE_JOBS"] == 0
        assert quota["remaining"]["DAILY_IMAGE_CREATIONS"] == 1497

        # A job made through the native API answers /status/:id in weights.gg words too.
        native = await client.post("/api/generate", json={"prompt": "native job"}, headers=key())
        native_id = native.json()["job_id"]
        assert (await follow(stack, native_id, {"COMPLETED", "FAILED"}))[-1]["status"] == "COMPLETED"


async def test_bad_input_is_a_4xx_json_error(storage_config: S3Config, seed_backend: Backend, tmp_path: Any) -> None:
    database_url = f"sqlite:///{tmp_path}/rm.db"
    async with running_stack(
        "memory://seed-weights-bad", storage_config, database_url, seed_backend, catalog=seed_catalog()
    ) as stack:
        client = stack.client
        for url in ("/generateImage", "/generateImage?prompt=", "/generateImage?prompt=%20%20", "/generateImage?x=1"):
            assert_json_error(await client.get(url, headers=key()), 400)
        long_prompt = await client.get("/generateImage", params={"prompt": "x" * 2001}, headers=key())
        assert "prompt" in assert_json_error(long_prompt, 400)["message"]
        unknown = await client.get("/generateImage", params={"prompt": "p", "loraName": "No Such"}, headers=key())
        assert "No Such" in assert_json_error(unknown, 400)["message"]
        for url in ("/search-loras", "/search-loras?query=", f"/search-loras?query={'q' * 201}"):
            assert_json_error(await client.get(url, headers=key()), 400)

        # No key, or a wrong one: 401 on every route (anonymous access is off here).
        for url in ("/generateImage?prompt=p", "/search-loras?query=p", "/quota", f"/status/{uuid.uuid4().hex}"):
            assert_json_error(await client.get(url), 401)
            assert_json_error(await client.get(url, headers=key("wrong")), 401)

        # Unknown ids, malformed ids, path traversal: NOT_FOUND (or the router's 404), never a 500.
        for image_id in (uuid.uuid4().hex, str(uuid.uuid4()), "not-an-id", "%2e%2e", "x" * 500):
            missing = await client.get(f"/status/{image_id}", headers=key())
            body = assert_json_error(missing, 404)
            assert body["status"] == "NOT_FOUND" and body["error"] and body["message"], body
        for url in ("/status/..%2F..%2Fetc%2Fpasswd", "/status/../../etc/passwd", "/status/a/b"):
            response = await client.get(url, headers=key())
            assert 400 <= response.status_code < 500, (url, response.status_code)
            json.loads(response.text)

        # Another owner's job reads as not found; the owner sees it.
        mine = (await client.get("/generateImage?prompt=mine", headers=key())).json()["imageId"]
        other = await client.get(f"/status/{mine}", headers=key(KEY_BOB))
        assert assert_json_error(other, 404)["status"] == "NOT_FOUND"
        assert (await client.get(f"/status/{mine}", headers=key())).status_code == 200
        await follow(stack, mine, {"COMPLETED", "FAILED"})


async def test_a_lora_the_model_cannot_take_is_refused(
    storage_config: S3Config, seed_backend: Backend, tmp_path: Any
) -> None:
    # flux-1 takes no LoRAs: with it as the default, loraName is a 400, never silently dropped.
    catalog = seed_catalog().model_copy(update={"default": "flux-1"})
    database_url = f"sqlite:///{tmp_path}/rm.db"
    async with running_stack(
        "memory://seed-weights-nolora", storage_config, database_url, seed_backend, catalog=catalog
    ) as stack:
        response = await stack.client.get(
            "/generateImage", params={"prompt": "p", "loraName": "Pixel Portrait"}, headers=key()
        )
        assert "does not support LoRAs" in assert_json_error(response, 400)["message"]
        quota = (await stack.client.get("/quota", headers=key())).json()
        assert quota["usage"]["DAILY_IMAGE_CREATIONS"] == 0  # nothing was queued
