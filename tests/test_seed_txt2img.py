"""Seed 004 (txt2img): its README's request examples, run as written, on the native API it describes.

The examples are read out of the README (JSONC: comments stripped), so a change there is a change here.
txt2img sends no API key, so the stack allows anonymous access.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from storage.object_store import S3Config
from tests.seed_catalog import seed_catalog
from tests.stack import running_stack, served
from tests.test_sse import parse_sse
from workers.backends.base import Backend

# A copy of ../shared/seeds/004_*.txt, kept in the repo so a clone alone runs the test.
SEED = Path(__file__).parent / "seeds" / "004_txt2img.txt"


def readme_examples() -> dict[str, dict[str, Any]]:
    """Each ``### <title>`` section's ```jsonc block, parsed."""
    examples = {}
    for section in SEED.read_text().split("\n### ")[1:]:
        title, _, text = section.partition("\n")
        block = re.search(r"```jsonc\n(.*?)```", text, flags=re.S)
        if block:
            examples[title.strip()] = json.loads(re.sub(r"//[^\n]*", "", block[1]))
    return examples


def test_the_readme_has_the_five_examples() -> None:
    assert set(readme_examples()) == {
        "SDXL / Illustrious",
        "With LoRA (SDXL only)",
        "Chroma",
        "Flux Dev / Schnell",
        "Z-Image Turbo",
    }


async def test_every_readme_example_runs_through_jobs_sse_images_and_thumbs(
    storage_config: S3Config, seed_backend: Backend, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path}/rm.db"
    async with (
        running_stack(
            "memory://txt2img", storage_config, db, seed_backend, catalog=seed_catalog(), allow_anonymous=True
        ) as stack,
        served(stack.config) as client,
    ):
        info = (await client.get("/api/info")).json()
        schema = info["models"][info["default"]]["parameters"]
        assert {"prompt", "negative_prompt", "width", "height", "seed", "loras"} <= set(schema["properties"])
        assert [lora["id"] for lora in info["models"][info["default"]]["loras"]] == ["civitai_1963644"]
        assert (await client.get("/docs")).status_code == 200

        async with client.stream("GET", "/api/sse/gallery") as gallery_stream:
            gallery_lines = gallery_stream.aiter_lines()
            assert await anext(gallery_lines) == ": connected"
            jobs = {}
            for title, body in readme_examples().items():
                accepted = await client.post("/api/generate", json=body)
                assert accepted.status_code == 202, (title, accepted.text)
                jobs[title] = accepted.json()["job_id"]

            finals = {}
            for title, job_id in jobs.items():
                async with client.stream("GET", f"/api/sse/{job_id}") as stream:
                    events = parse_sse("".join([chunk async for chunk in stream.aiter_text()]))
                finals[title] = events[-1]
                assert events[-1]["status"] in ("completed", "failed"), (title, events)
                if events[-1]["status"] == "completed":
                    steps = [e["step"] for e in events if e["status"] == "processing" and e.get("step")]
                    assert steps and steps == sorted(steps), (title, events)

            # The LoRA example is accepted (the catalog knows the LoRA) and fails clearly: never dropped.
            lora_job = finals.pop("With LoRA (SDXL only)")
            assert lora_job["status"] == "failed" and "civitai_1963644" in lora_job["error"], lora_job
            assert lora_job["images"] == [] and lora_job["loras"][0] == {
                "id": "civitai_1963644",
                "weight": 0.8,
                "trigger_weight": 0.5,
            }

            for title, final in finals.items():
                assert final["status"] == "completed", (title, final)
                image = final["images"][0]
                assert (image["width"], image["height"]) == (1024, 1024), title
                job = (await client.get(f"/api/jobs/{final['id']}")).json()
                assert job["status"] == "completed" and job["images"][0]["id"] == image["id"]
                full = await client.get(f"/api/images/{image['id']}.png")
                assert full.headers["content-type"] == "image/png" and full.content.startswith(b"\x89PNG")
                thumb = await client.get(f"/api/thumbs/{image['id']}.png")
                assert thumb.headers["content-type"] == "image/jpeg"
                assert max(Image.open(io.BytesIO(thumb.content)).size) == 256

            sdxl = finals["SDXL / Illustrious"]
            assert sdxl["seed"] == 42 and sdxl["images"][0]["seed"] == 42
            assert sdxl["negative_prompt"].startswith("worst quality")

            # Every stored image came down the gallery stream.
            streamed: set[str] = set()
            async with asyncio.timeout(30):
                while len(streamed) < len(finals):
                    line = await anext(gallery_lines)
                    if line.startswith("data:"):
                        streamed.add(json.loads(line[5:])["job_id"])
            assert streamed == {final["id"] for final in finals.values()}

        listed = (await client.get("/api/images?limit=50")).json()
        assert listed["total"] == len(finals)

        # Same seed, same model, same device: the same image.
        again = (await client.post("/api/generate", json=readme_examples()["SDXL / Illustrious"])).json()["job_id"]
        async with client.stream("GET", f"/api/sse/{again}") as stream:
            repeat = parse_sse("".join([chunk async for chunk in stream.aiter_text()]))[-1]
        first_png = (await client.get(f"/api/images/{sdxl['images'][0]['id']}")).content
        second_png = (await client.get(f"/api/images/{repeat['images'][0]['id']}")).content
        assert first_png == second_png


@pytest.mark.parametrize(
    "path", ["/api/images/..%2F..%2Fetc%2Fpasswd", "/api/thumbs/..%2F.env", "/api/images/a.png", "/api/jobs/1"]
)
async def test_bad_filenames_and_ids_are_404_json(
    path: str, storage_config: S3Config, seed_backend: Backend, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path}/rm.db"
    async with running_stack(
        "memory://txt2img-bad", storage_config, db, seed_backend, workers=0, allow_anonymous=True
    ) as stack:
        response = await stack.client.get(path)
        assert response.status_code == 404 and response.json()["status"] == "error", response.text
