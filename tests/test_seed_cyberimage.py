"""Seed 003 (CyberImage): every example of its README against a running stack, and its client workflow.

CyberImage sends no API key, so this stack allows anonymous access (IMAGEBUS_INGRESS_ALLOW_ANONYMOUS);
reset_queue stays admin-only. The model names are the README's, backed by the tiny offline pipeline.
"""

from __future__ import annotations

import asyncio
import io
import re
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from storage.object_store import S3Config
from tests.seed_catalog import seed_catalog
from tests.stack import KEY_ADMIN, auth, running_stack, served
from workers.backends.base import Backend

# A copy of ../shared/seeds/003_*.txt, kept in the repo so a clone alone runs the test.
SEED = Path(__file__).parent / "seeds" / "003_cyberimage.txt"
# Every documented status field, and every progress flag.
STATUS_FIELDS = {
    "id", "status", "model_id", "prompt", "negative_prompt", "settings", "created_at", "started_at",
    "completed_at", "message", "progress", "images",
}  # fmt: skip
PROGRESS_FIELDS = {"preparing", "loading_model", "generating", "saving", "completed", "failed", "step", "total_steps"}
COUNT_FIELDS = {"pending", "processing", "completed", "failed", "total"}


def client_workflow(api_base: str) -> str:
    """The README's "Example Client Workflow" code block, with API_BASE pointed at this stack."""
    text = SEED.read_text()
    code = text.split("### Example Client Workflow:", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert 'API_BASE = "http://localhost:5050/api"' in code
    return code.replace('API_BASE = "http://localhost:5050/api"', f'API_BASE = "{api_base}"')


async def poll(client: httpx.AsyncClient, job_id: str, timeout_s: float = 180.0) -> list[dict[str, Any]]:
    """Every status answer until the job ends (like the README's loop, faster)."""
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout_s):
        while True:
            response = await client.get(f"/api/status/{job_id}")
            assert response.status_code == 200, response.text
            seen.append(response.json())
            if seen[-1]["status"] in ("completed", "failed"):
                return seen
            await asyncio.sleep(0.05)


@pytest.fixture
async def cyberimage(storage_config: S3Config, seed_backend: Backend, tmp_path: Path) -> Any:
    db = f"sqlite:///{tmp_path}/rm.db"
    async with (
        running_stack(
            "memory://cyberimage", storage_config, db, seed_backend, catalog=seed_catalog(), allow_anonymous=True
        ) as stack,
        served(stack.config) as replica,
    ):
        yield stack, replica


async def test_the_readme_client_workflow_runs_as_written(cyberimage: Any, tmp_path: Path) -> None:
    _, replica = cyberimage
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        client_workflow(str(replica.base_url).rstrip("/") + "/api"),
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 180)
    text = output.decode()
    assert process.returncode == 0, text
    assert "Saved image 1/2" in text and "Saved image 2/2" in text, text
    for index in (1, 2):
        with Image.open(tmp_path / f"generated_image_{index}.png") as image:
            assert image.format == "PNG" and image.size == (64, 64)


async def test_every_readme_example_answers_with_its_documented_fields(cyberimage: Any) -> None:
    stack, client = cyberimage
    # 1. GET /models
    models = (await client.get("/api/models")).json()
    assert set(models) >= {"models", "default"}
    for key in ("flux-1", "sd-3.5", "flux-abliterated"):
        assert models["models"][key]["id"] == key and models["models"][key]["description"]

    # 2. POST /generate, the README's curl body as written (2 images, 35 steps, 1024x1024).
    body = {
        "model_id": "sd-3.5",
        "prompt": "A cyberpunk city at night with neon signs and flying cars, highly detailed",
        "negative_prompt": "blurry, low quality, distorted, bad anatomy, text, watermark",
        "settings": {"num_images": 2, "num_inference_steps": 35, "guidance_scale": 8.0, "height": 1024, "width": 1024},
    }
    accepted = await client.post("/api/generate", json=body)
    assert accepted.status_code in (200, 202), accepted.text
    submitted = accepted.json()
    assert submitted["status"] == "pending" and submitted["num_images"] == 2
    assert submitted["message"] == "Image generation job submitted successfully for 2 image(s)"
    job_id = submitted["job_id"]

    # 3. GET /status/<job_id>: pending, processing with progress flags and steps, completed with images.
    seen = await poll(client, job_id)
    for status in seen:
        assert set(status) >= STATUS_FIELDS and set(status["progress"]) == PROGRESS_FIELDS, status
    generating = [s for s in seen if s["status"] == "processing" and s["progress"]["generating"]]
    assert generating, [s["status"] for s in seen]
    assert re.fullmatch(r"Generating 2 image\(s\)\.\.\. Step \d+/35", generating[0]["message"])
    done = seen[-1]
    assert done["status"] == "completed" and done["progress"]["completed"] and done["message"] == "Generated 2 image(s)"
    assert done["model_id"] == "sd-3.5" and done["negative_prompt"] == body["negative_prompt"]
    assert done["settings"]["num_inference_steps"] == 35 and done["settings"]["height"] == 1024
    assert done["created_at"].endswith("Z") and done["started_at"] and done["completed_at"]
    assert len(done["images"]) == 2
    for number, image in enumerate(done["images"], start=1):
        assert {"id", "file_path", "created_at", "metadata"} <= set(image)
        metadata = image["metadata"]
        assert metadata["model_id"] == "sd-3.5" and metadata["prompt"] == body["prompt"]
        assert metadata["image_number"] == number and metadata["total_images"] == 2
        assert {"negative_prompt", "settings"} <= set(metadata)
    image_id = done["images"][0]["id"]

    # 4. GET /get_image/<image_id>
    png = await client.get(f"/api/get_image/{image_id}")
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (1024, 1024)

    # 5. GET /image/<image_id>/metadata
    meta = (await client.get(f"/api/image/{image_id}/metadata")).json()
    expected = {"model_id", "prompt", "negative_prompt", "settings", "generation_time", "image_number", "total_images"}
    assert expected <= set(meta) and meta["model_id"] == "sd-3.5" and isinstance(meta["generation_time"], float)

    # 9. GET /gallery, plain and with search + model.
    gallery = (await client.get("/api/gallery?page=1&limit=20")).json()
    assert {"images", "page", "limit", "has_more", "total"} <= set(gallery) and gallery["total"] == 2
    for item in gallery["images"]:
        assert {"id", "model_id", "prompt", "created_at", "settings"} <= set(item)
        assert {"num_inference_steps", "guidance_scale"} <= set(item["settings"])
    searched = (await client.get("/api/gallery?search=cyberpunk&model=flux-1")).json()
    assert searched["total"] == 0  # it was made with sd-3.5
    assert (await client.get("/api/gallery?search=cyberpunk&model=sd-3.5")).json()["total"] == 2

    # 6. DELETE /image/<image_id>
    deleted = await client.delete(f"/api/image/{image_id}")
    assert deleted.json() == {"status": "success", "message": "Image deleted successfully"}
    assert (await client.get(f"/api/get_image/{image_id}")).status_code == 404
    assert (await client.get("/api/gallery")).json()["total"] == 1

    # 7. GET /queue, basic and detailed.
    queue = (await client.get("/api/queue")).json()
    assert COUNT_FIELDS | {"queue_size"} <= set(queue) and queue["completed"] == 1 and queue["total"] == 1
    detailed = (await client.get("/api/queue?detailed=true")).json()
    assert set(detailed["recent_24h"]) >= COUNT_FIELDS and detailed["recent_24h"]["completed"] == 1
    assert detailed["avg_processing_time_seconds"] > 0 and detailed["failure_rate"] == 0.0
    assert set(detailed["models"]["sd-3.5"]) >= COUNT_FIELDS

    # 8. POST /reset_queue: admin-only here (the README's keyless call is refused clearly).
    refused = await client.post("/api/reset_queue")
    assert refused.status_code == 403 and refused.json()["status"] == "error"
    reset = (await client.post("/api/reset_queue", headers=auth(KEY_ADMIN))).json()
    assert reset == {"status": "success", "reset_count": 0, "message": "Reset 0 stalled jobs to pending status"}

    # 10. POST /enrich
    enriched = (await client.post("/api/enrich", json={"prompt": "a castle on a hill", "style": "fantasy"})).json()
    assert enriched["original_prompt"] == "a castle on a hill" and enriched["style"] == "fantasy"
    assert "a castle on a hill" in enriched["enriched_prompt"] and len(enriched["enriched_prompt"]) > 60
    assert stack.config.allow_anonymous


async def test_flux_ignores_the_negative_prompt_and_says_so_and_a_canceled_job_reads_failed(cyberimage: Any) -> None:
    _, client = cyberimage
    body = {
        "model_id": "flux-1",
        "prompt": "neon alley",
        "negative_prompt": "blurry",
        "settings": {"num_inference_steps": 2},
    }
    job_id = (await client.post("/api/generate", json=body)).json()["job_id"]
    done = (await poll(client, job_id))[-1]
    assert done["status"] == "completed" and done["negative_prompt"] is None
    assert done["images"][0]["metadata"]["ignored_parameters"] == ["negative_prompt"]
    meta = (await client.get(f"/api/image/{done['images'][0]['id']}/metadata")).json()
    assert meta["ignored_parameters"] == ["negative_prompt"]
    # The native API keeps refusing it: only CyberImage documents ignoring it.
    native = await client.post("/api/generate", json={"model": "flux-1", "prompt": "x", "negative_prompt": "y"})
    assert native.status_code == 400 and native.json()["status"] == "error"

    long = {
        "model_id": "sd-3.5",
        "prompt": "slow",
        "settings": {"num_inference_steps": 50, "width": 512, "height": 512},
    }
    job_id = (await client.post("/api/generate", json=long)).json()["job_id"]
    await client.post(f"/api/jobs/{job_id}/cancel")
    ended = (await poll(client, job_id))[-1]
    assert ended["status"] == "failed" and ended["progress"]["failed"] and ended["error_message"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/api/status/nope", None, 404),
        ("GET", "/api/status/..%2F..%2Fetc%2Fpasswd", None, 404),
        ("GET", "/api/get_image/img_123456", None, 404),
        ("GET", "/api/get_image/..%2F..%2Fetc%2Fpasswd", None, 404),
        ("GET", "/api/image/img_123456/metadata", None, 404),
        ("DELETE", "/api/image/img_123456", None, 404),
        ("GET", "/api/gallery?page=0", None, 400),
        ("GET", "/api/gallery?limit=1000", None, 400),
        ("GET", "/api/queue?detailed=maybe", None, 400),
        ("POST", "/api/enrich", {"prompt": "a castle", "style": "baroque"}, 400),
        ("POST", "/api/enrich", {"style": "anime"}, 400),
        ("POST", "/api/generate", {"model_id": "flux-9", "prompt": "x"}, 400),
        ("POST", "/api/generate", {"model_id": "flux-1", "prompt": "x", "settings": {"num_images": 9}}, 400),
        ("POST", "/api/generate", {"model_id": "flux-1", "prompt": "x", "settings": {"width": 2048}}, 400),
        ("POST", "/api/generate", {"model_id": "flux-1", "prompt": "x", "settings": {"callback": 1}}, 400),
        ("POST", "/api/generate", {"model_id": "flux-1"}, 400),
    ],
)
async def test_bad_input_is_a_4xx_json_error(
    method: str, path: str, body: dict[str, Any] | None, status: int, cyberimage: Any
) -> None:
    _, client = cyberimage
    response = await client.request(method, path, json=body)
    assert response.status_code == status, (path, response.text)
    assert response.json()["status"] == "error" and response.json()["message"]
