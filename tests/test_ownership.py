"""Every job and image belongs to the key that made it: any other key gets 404 (invariant 7).

Alice makes one job with one image. Bob then tries every route of the app that takes an id in
its path, with Alice's ids: a table says what each must answer, and every route with a path
parameter must be in the table, so a route added later without an ownership check fails here
until someone decides what it should answer. Listings must not show Alice's objects to Bob.
(The gallery's live stream is held to the same rule in test_native_jobs_and_gallery.py.)

Images leave the API only as presigned object-store URLs that end with the image, or as signed
``/files`` links; no route hands image bytes to a caller without a key or a signature.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

from litestar import Litestar
from litestar.routes import HTTPRoute

from storage.object_store import S3Config
from tests.stack import KEY_ADMIN, KEY_ALICE, KEY_BOB, Stack, assert_json_error, auth, fetch, running_stack
from workers.backends.base import Backend

PROMPT = "alice's private lighthouse at dusk"


@dataclass(frozen=True)
class Probe:
    """One request Bob makes with Alice's ids (``{job}``, ``{job_uuid}``, ``{image}``, ``{object}``)."""

    method: str
    path: str
    expect: int = 404
    body: dict[str, Any] | None = None
    # Routes that need no key must still refuse, so these go without one.
    keyless: bool = False
    # The error is the API's JSON shape (the OpenAPI renderer's own pages answer in HTML).
    json_error: bool = True


# Every (method, route) of the app with a path parameter, and how Bob's attempts must end.
OWNERSHIP_TABLE: dict[tuple[str, str], list[Probe]] = {
    # Native jobs.
    ("GET", "/api/jobs/{job_id:str}"): [Probe("GET", "/api/jobs/{job}"), Probe("GET", "/api/jobs/{job_uuid}")],
    ("POST", "/api/jobs/{job_id:str}/cancel"): [Probe("POST", "/api/jobs/{job}/cancel")],
    # A PUT makes a job under a client-chosen id: an id in use is a 409 that says nothing of the job.
    ("PUT", "/api/jobs/{job_id:str}"): [
        Probe("PUT", "/api/jobs/{job}", 409, {"prompt": "bob's", "width": 64, "height": 64})
    ],
    ("GET", "/api/sse/{job_id:str}"): [Probe("GET", "/api/sse/{job}")],
    # Native images (and CyberImage's second paths of the same handlers).
    ("GET", "/api/images/{filename:str}"): [
        Probe("GET", "/api/images/{image}"),
        Probe("GET", "/api/images/{image}.png"),
        Probe("GET", "/api/images/{image}.png?format=jpeg"),
    ],
    ("GET", "/api/thumbs/{filename:str}"): [Probe("GET", "/api/thumbs/{image}.jpg")],
    ("GET", "/api/images/{filename:str}/metadata"): [Probe("GET", "/api/images/{image}/metadata")],
    ("GET", "/api/image/{filename:str}/metadata"): [Probe("GET", "/api/image/{image}/metadata")],
    ("DELETE", "/api/images/{filename:str}"): [Probe("DELETE", "/api/images/{image}")],
    ("DELETE", "/api/image/{filename:str}"): [Probe("DELETE", "/api/image/{image}")],
    # Dialects: weights.gg / Chutes status, CyberImage status and image.
    ("GET", "/status/{job_id:str}"): [Probe("GET", "/status/{job}"), Probe("GET", "/status/{job_uuid}")],
    ("GET", "/api/status/{job_id:str}"): [Probe("GET", "/api/status/{job}")],
    ("GET", "/api/get_image/{image_id:str}"): [Probe("GET", "/api/get_image/{image}")],
    # Signed links: the signature is the permission; without Alice's, nobody gets her image.
    ("GET", "/files/{filename:str}"): [
        Probe("GET", "/files/{image}.png", 403),
        Probe("GET", "/files/{image}.png?sig=" + "0" * 32, 403),
        Probe("GET", "/files/{image}.png", 403, keyless=True),
    ],
    ("GET", "/files/thumbs/{filename:str}"): [Probe("GET", "/files/thumbs/{image}.jpg", 403, keyless=True)],
    # Admin only: a user key is refused before any id is looked at.
    ("DELETE", "/api/keys/{key_id:str}"): [Probe("DELETE", "/api/keys/{job}", 403)],
    # Catalog art, owned by no one: an image id is no LoRA.
    ("GET", "/api/loras/{lora_id:str}/image"): [Probe("GET", "/api/loras/{image}/image", keyless=True)],
    # The web page's own files: nothing of the object store is reachable under them.
    ("GET", "/static/{file_path:path}"): [
        Probe("GET", "/static/{object}", keyless=True),
        Probe("GET", "/static/{image}.png", keyless=True),
    ],
    ("HEAD", "/static/{file_path:path}"): [Probe("HEAD", "/static/{object}", keyless=True)],
    # The OpenAPI renderers' paths: documents only.
    ("GET", "/docs/{path:str}"): [Probe("GET", "/docs/{image}", keyless=True, json_error=False)],
}


def routes_with_path_parameters(app: Litestar) -> set[tuple[str, str]]:
    return {
        (method, route.path)
        for route in app.routes
        if isinstance(route, HTTPRoute) and route.path_parameters
        for method in route.methods
        if method != "OPTIONS"
    }


def env_owner(key: str) -> str:
    """The owner id an IMAGEBUS_API_KEYS key records its jobs under (tests/stack.py's secret)."""
    return hmac.new(b"test-secret", key.encode(), hashlib.sha256).hexdigest()[:32]


async def alices_job(stack: Stack) -> dict[str, Any]:
    body = {"prompt": PROMPT, "width": 64, "height": 64, "num_inference_steps": 2}
    response = await stack.client.post("/api/generate", json=body, headers=auth(KEY_ALICE))
    assert response.status_code == 202, response.text
    job = await stack.wait_for_status(response.json()["job_id"], {"completed", "failed"})
    assert job["status"] == "completed" and len(job["images"]) == 1, job
    return job


async def test_another_key_gets_404_on_every_route_that_takes_an_id(
    storage_config: S3Config, tiny_backend: Backend, tmp_path: Any
) -> None:
    database_url = f"sqlite:///{tmp_path}/rm.db"
    async with running_stack(
        f"memory://ownership-{uuid.uuid4().hex[:8]}", storage_config, database_url, tiny_backend
    ) as stack:
        app = stack.client.app
        assert isinstance(app, Litestar)
        routes = routes_with_path_parameters(app)
        unlisted = routes - OWNERSHIP_TABLE.keys()
        assert not unlisted, f"routes with an id in the path but no ownership probe: {sorted(unlisted)}"
        assert not OWNERSHIP_TABLE.keys() - routes, "probes for routes the app no longer has"

        job = await alices_job(stack)
        image = job["images"][0]
        ids = {
            "job": job["id"],
            "job_uuid": str(uuid.UUID(hex=job["id"])),
            "image": image["id"],
            "object": urlsplit(image["url"]).path.lstrip("/"),
        }

        for (method, route), probes in OWNERSHIP_TABLE.items():
            for probe in probes:
                path = probe.path.format(**ids)
                headers = {} if probe.keyless else auth(KEY_BOB)
                response = await stack.client.request(probe.method, path, headers=headers, json=probe.body)
                where = f"{method} {route} as {path}"
                assert response.status_code == probe.expect, (where, response.status_code, response.text)
                if probe.json_error and probe.method != "HEAD":
                    assert_json_error(response, probe.expect)
                assert PROMPT not in response.text, where

        # Listings: nothing of Alice's shows in Bob's.
        for path in ("/api/jobs", "/api/images", "/api/gallery", "/status", "/api/queue?detailed=true"):
            response = await stack.client.get(path, headers=auth(KEY_BOB))
            assert response.status_code == 200, (path, response.text)
            for secret in (PROMPT, job["id"], ids["job_uuid"], image["id"]):
                assert secret not in response.text, (path, response.text)
        assert (await stack.client.get("/api/jobs", headers=auth(KEY_BOB))).json()["total"] == 0
        assert (await stack.client.get("/api/images", headers=auth(KEY_BOB))).json()["total"] == 0

        # Bob's DELETEs removed nothing: Alice still has her image.
        mine = await stack.client.get(f"/api/images/{image['id']}", headers=auth(KEY_ALICE))
        assert mine.status_code == 200 and mine.headers["content-type"] == "image/png"
        assert (await stack.client.get("/api/images", headers=auth(KEY_ALICE))).json()["total"] == 1

        # Admins may read other owners' jobs; a user may not even ask.
        seen = await stack.client.get(f"/api/jobs/{job['id']}", headers=auth(KEY_ADMIN))
        assert seen.status_code == 200 and seen.json()["prompt"] == PROMPT
        listed = await stack.client.get(f"/api/jobs?owner={env_owner(KEY_ALICE)}", headers=auth(KEY_ADMIN))
        assert [item["id"] for item in listed.json()["jobs"]] == [job["id"]]
        assert_json_error(await stack.client.get(f"/api/jobs?owner={env_owner(KEY_ALICE)}", headers=auth(KEY_BOB)), 403)


async def test_image_urls_are_presigned_and_end_with_the_image(
    storage_config: S3Config, tiny_backend: Backend, tmp_path: Any
) -> None:
    database_url = f"sqlite:///{tmp_path}/rm.db"
    async with running_stack(
        f"memory://presigned-{uuid.uuid4().hex[:8]}", storage_config, database_url, tiny_backend
    ) as stack:
        job = await alices_job(stack)
        image = job["images"][0]

        url = urlsplit(image["url"])
        query = parse_qs(url.query)
        assert {"X-Amz-Signature", "X-Amz-Date", "X-Amz-Expires", "X-Amz-Credential"} <= query.keys(), image["url"]
        signed_at = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        ends_at = signed_at + timedelta(seconds=int(query["X-Amz-Expires"][0]))
        expires_at = datetime.fromisoformat(image["expires_at"])
        assert expires_at - timedelta(seconds=2) <= ends_at <= expires_at, (ends_at, expires_at)

        direct = await fetch(image["url"])
        assert direct.status_code == 200 and direct.content[:8] == b"\x89PNG\r\n\x1a\n"
        # The signature is what opens it: the bare object URL is refused by the object store.
        bare = await fetch(url._replace(query="").geturl())
        assert bare.status_code in (401, 403), (bare.status_code, bare.text[:200])
        assert bare.content[:8] != b"\x89PNG\r\n\x1a\n"

        # The signed link works without a key (that is what it is for); a forged one does not.
        signed = await stack.client.get(image["file_url"])
        assert signed.status_code == 200 and signed.headers["content-type"] == "image/png"

        # No route of the app serves image bytes to a caller with neither key nor signature.
        app = stack.client.app
        assert isinstance(app, Litestar)
        served_images = []
        for route in app.routes:
            if not isinstance(route, HTTPRoute) or "GET" not in route.methods:
                continue
            for filename in (image["id"], f"{image['id']}.png", f"{image['id']}.jpg", url.path.lstrip("/")):
                path = route.path
                for parameter in route.path_parameters.values():
                    path = path.replace("{" + parameter.full + "}", filename)
                response = await stack.client.get(path)
                if response.status_code == 200 and response.headers.get("content-type", "").startswith("image/"):
                    served_images.append(path)
                if not route.path_parameters:
                    break
        assert served_images == [], served_images
