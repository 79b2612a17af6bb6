"""Bad input gets a 4xx JSON error and publishes nothing."""

from __future__ import annotations

from typing import Any

import pytest

from storage.object_store import S3Config
from tests.stack import auth, running_stack
from workers.backends.base import Backend

BAD_BODIES: list[tuple[str, Any, int, str]] = [
    ("missing prompt", {"num_images": 1}, 400, "prompt"),
    ("empty prompt", {"prompt": "  "}, 400, "prompt"),
    ("unknown field", {"prompt": "x", "colour": "red"}, 400, "colour"),
    ("huge width", {"prompt": "x", "width": 100000}, 400, "width"),
    ("too many images", {"prompt": "x", "num_images": 9}, 400, "num_images"),
    ("zero images", {"prompt": "x", "num_images": 0}, 400, "num_images"),
    ("width above model max", {"prompt": "x", "width": 4096}, 400, "width"),
    ("width not multiple of 8", {"prompt": "x", "width": 100}, 400, "multiple of 8"),
    ("too many steps", {"prompt": "x", "num_inference_steps": 400}, 400, "num_inference_steps"),
    ("unknown model", {"prompt": "x", "model": "nope"}, 400, "unknown model"),
    ("wrong type", {"prompt": "x", "seed": "abc"}, 400, "seed"),
    ("not an object", ["prompt"], 400, ""),
    ("long negative prompt", {"prompt": "x", "negative_prompt": "n" * 501}, 400, "negative_prompt"),
]


async def test_bad_input_is_rejected_and_nothing_published(
    storage_config: S3Config, tiny_backend: Backend, tmp_path: Any
) -> None:
    async with running_stack(
        "memory://validation", storage_config, f"sqlite:///{tmp_path}/rm.db", tiny_backend
    ) as stack:
        for name, body, code, mention in BAD_BODIES:
            response = await stack.client.post("/api/generate", json=body, headers=auth())
            assert response.status_code == code, (name, response.text)
            payload = response.json()
            assert payload["status"] == "error", name
            assert mention in payload["message"], (name, payload)

        malformed = await stack.client.post(
            "/api/generate",
            content=b'{"prompt": "x",',
            headers={**auth(), "Content-Type": "application/json"},
        )
        assert malformed.status_code == 400 and malformed.json()["status"] == "error"

        too_big = await stack.client.post("/api/generate", json={"prompt": "x" * 100_000}, headers=auth())
        assert too_big.status_code == 413 and too_big.json()["status"] == "error"

        no_key = await stack.client.post("/api/generate", json={"prompt": "x"})
        assert no_key.status_code == 401

        for path in ("/api/jobs/not-an-id", "/api/jobs/" + "0" * 32, "/api/images/../../etc/passwd"):
            response = await stack.client.get(path, headers=auth())
            assert response.status_code == 404, (path, response.text)
            assert response.json()["status"] == "error"

        assert await stack.bus.command_backlog("diffusers") == 0
        async with stack.bus.read_events(idle_timeout_s=0.3) as events:
            assert [logged async for logged in events] == []


@pytest.mark.parametrize("path", ["/health", "/docs", "/docs/openapi.json"])
async def test_health_and_docs(storage_config: S3Config, tiny_backend: Backend, tmp_path: Any, path: str) -> None:
    async with running_stack("memory://docs", storage_config, f"sqlite:///{tmp_path}/rm.db", tiny_backend) as stack:
        response = await stack.client.get(path)
        assert response.status_code == 200
        if path == "/docs/openapi.json":
            assert "/api/generate" in response.json()["paths"]
