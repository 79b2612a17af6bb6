"""GET /api/models, /api/info and /api/jobs (issue 3's first native endpoints)."""

from __future__ import annotations

from typing import Any

from storage.object_store import S3Config
from tests.stack import KEY_BOB, auth, running_stack
from workers.backends.base import Backend

SMALL = {"prompt": "p", "width": 64, "height": 64, "num_inference_steps": 2}


async def test_models_and_info_describe_the_catalog(
    storage_config: S3Config, tiny_backend: Backend, tmp_path: Any
) -> None:
    database_url = f"sqlite:///{tmp_path}/rm.db"
    async with running_stack("memory://catalog", storage_config, database_url, tiny_backend) as stack:
        models = (await stack.client.get("/api/models")).json()
        assert models["default"] == "tiny-sd"
        tiny = models["models"]["tiny-sd"]
        assert tiny["id"] == "tiny-sd" and tiny["random_weights"] is True and "RANDOM WEIGHTS" in tiny["description"]
        assert models["models"]["sd-turbo"]["source"] == "stabilityai/sd-turbo"

        info = (await stack.client.get("/api/info")).json()
        schema = info["models"]["tiny-sd"]["parameters"]
        assert schema["required"] == ["prompt"] and schema["additionalProperties"] is False
        assert schema["properties"]["width"] == {
            "type": "integer", "minimum": 8, "maximum": 1024, "multipleOf": 8, "default": 64,
        }  # fmt: skip
        assert schema["properties"]["num_images"]["maximum"] == 8
        assert info["models"]["tiny-sd"]["loras"] == []
        # The seeds' models, with what each can and cannot take.
        assert {"sd-1.5", "sdxl", "illustrious", "sdxl-turbo", "sd-3.5", "flux-1", "flux-schnell", "chroma",
                "z-image-turbo", "tiny-sdxl", "tiny-flux"} <= set(models["models"])  # fmt: skip
        assert models["models"]["flux-1"]["supports_negative_prompt"] is False
        schnell = info["models"]["flux-schnell"]["parameters"]["properties"]
        assert schnell["guidance_scale"]["const"] == 0.0 and "negative_prompt" not in schnell
        refused = await stack.client.post(
            "/api/generate", json={"model": "flux-schnell", "prompt": "x", "guidance_scale": 3.5}, headers=auth()
        )
        assert refused.status_code == 400 and "does not use guidance_scale" in refused.json()["message"]
        odd = await stack.client.post("/api/generate", json={"model": "tiny-flux", "prompt": "x", "width": 72},
                                      headers=auth())  # fmt: skip
        assert odd.status_code == 400 and "multiple of 16" in odd.json()["message"]


async def test_job_list_is_the_callers_own_newest_first_and_paginated(
    storage_config: S3Config, tiny_backend: Backend, database_url: str
) -> None:
    async with running_stack("memory://lists", storage_config, database_url, tiny_backend) as stack:
        ids = []
        for n in range(3):
            response = await stack.client.post("/api/generate", json={**SMALL, "prompt": f"p{n}"}, headers=auth())
            ids.append(response.json()["job_id"])
        for job_id in ids:
            await stack.wait_for_status(job_id, {"completed"})
        await stack.client.post("/api/generate", json=SMALL, headers=auth(KEY_BOB))

        listing = (await stack.client.get("/api/jobs", headers=auth())).json()
        assert listing["total"] == 3 and listing["page"] == 1 and listing["limit"] == 20
        assert [job["id"] for job in listing["jobs"]] == ids[::-1]
        assert all(len(job["images"]) == 1 for job in listing["jobs"])

        second = (await stack.client.get("/api/jobs?page=2&limit=2", headers=auth())).json()
        assert [job["id"] for job in second["jobs"]] == [ids[0]] and second["total"] == 3
        done = (await stack.client.get("/api/jobs?status=completed", headers=auth())).json()
        assert done["total"] == 3
        assert (await stack.client.get("/api/jobs?status=failed", headers=auth())).json()["total"] == 0
        assert (await stack.client.get("/api/jobs", headers=auth(KEY_BOB))).json()["total"] == 1

        for query in ("page=0", "limit=0", "limit=1000", "page=abc", "status=bogus"):
            response = await stack.client.get(f"/api/jobs?{query}", headers=auth())
            assert response.status_code == 400, (query, response.text)
            assert response.json()["status"] == "error"
        assert (await stack.client.get("/api/jobs")).status_code == 401
