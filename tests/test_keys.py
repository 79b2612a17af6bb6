"""Database API keys: ``imagebus keys`` as a real subprocess, the keys on the API, roles, per-key quotas.

No workers run, so jobs stay queued and count against the active-jobs quota.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
import structlog
from litestar.connection import ASGIConnection
from sqlalchemy import select

from imagebus.settings import IngressSettings, KeysSettings
from ingress.auth import KeyRing, presented_key
from ingress.config import KEY_CACHE_S
from ingress.keys import DEVELOPMENT_KEY_SECRET
from projector.database import create_database
from projector.tables import api_keys
from storage.object_store import S3Config
from tests.stack import KEY_ADMIN, KEY_ALICE, Stack, assert_json_error, auth, running_stack
from workers.backends.base import Backend

SECRET = "test-secret"  # tests/stack.py's key_secret
KEY = re.compile(r"^ib_(?P<id>[0-9a-f]{12})_(?P<secret>[A-Za-z0-9_-]{43})$")
# Short, so waiting for a revoke to land costs little; the mechanism is the one of the default.
CACHE_S = 1.0


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


async def imagebus_keys(database_url: str, *args: str) -> Ran:
    env = {**os.environ, "IMAGEBUS_DATABASE_URL": database_url, "IMAGEBUS_KEY_SECRET": SECRET}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imagebus",
        "keys",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


async def stored_row(database_url: str, key_id: str) -> dict[str, Any]:
    database = create_database(database_url)
    try:
        row = await database.read(lambda conn: conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one())
    finally:
        await database.dispose()
    return dict(row._mapping)


async def submit(stack: Stack, key: str, num_images: int) -> Any:
    body = {"prompt": "a kite", "width": 64, "height": 64, "num_images": num_images}
    return await stack.client.post("/api/generate", json=body, headers=auth(key))


async def test_cli_keys_work_on_the_api_with_their_quotas_until_revoked(
    database_url: str, storage_config: S3Config, tiny_backend: Backend
) -> None:
    async with running_stack(
        f"memory://keys-{uuid.uuid4().hex[:8]}",
        storage_config,
        database_url,
        tiny_backend,
        workers=0,
        key_cache_s=CACHE_S,
    ) as stack:
        created = await imagebus_keys(
            database_url, "create", "--name", "ci robot", "--daily-images", "3", "--active-jobs", "2"
        )
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip()
        match = KEY.match(key)
        assert match, created.stdout
        key_id, secret_part = match["id"], match["secret"]
        assert "not be shown again" in created.stderr or "only time the key is shown" in created.stderr
        assert key not in created.stderr and secret_part not in created.stderr  # logs included

        # Stored as an HMAC under the server secret: no key material in the row.
        row = await stored_row(database_url, key_id)
        for value in row.values():
            assert key not in str(value) and secret_part not in str(value), row
        assert row["key_hash"] == hmac.new(SECRET.encode(), key.encode(), hashlib.sha256).hexdigest()
        assert row["role"] == "user" and row["daily_images"] == 3 and row["active_jobs"] == 2

        listed = await imagebus_keys(database_url, "list")
        assert listed.returncode == 0, listed.stderr
        line = next(line for line in listed.stdout.splitlines() if line.startswith(key_id))
        assert line.split()[:2] == [key_id, "ci"] and " user " in line and re.search(r"\b3\s+2\b", line), line
        assert secret_part not in listed.stdout and row["key_hash"] not in listed.stdout

        # The key works (both headers); its secret part is what makes it work.
        quota = await stack.client.get("/api/quota", headers={"Authorization": f"Bearer {key}"})
        assert quota.status_code == 200, quota.text
        assert quota.json()["limits"] == {"active_jobs": 2, "daily_images": 3}
        forged = f"ib_{key_id}_{'A' * len(secret_part)}"
        assert_json_error(await stack.client.get("/api/quota", headers=auth(forged)), 401)
        assert_json_error(await stack.client.get("/api/quota", headers=auth(f"ib_{'0' * 12}_{secret_part}")), 401)

        # Its own quotas, not the ingress's defaults (Alice keeps those).
        assert (await submit(stack, key, 2)).status_code == 202
        over_daily = await submit(stack, key, 2)
        assert_json_error(over_daily, 429)
        assert "daily images" in over_daily.json()["message"] and "of 3" in over_daily.json()["message"]
        assert (await submit(stack, key, 1)).status_code == 202
        over_active = await submit(stack, key, 1)
        assert_json_error(over_active, 429)
        assert "limit 2" in over_active.json()["message"]
        assert (await stack.client.get("/api/quota", headers=auth(key))).json() == {
            "usage": {"active_jobs": 2, "daily_images": 3},
            "limits": {"active_jobs": 2, "daily_images": 3},
            "remaining": {"active_jobs": 0, "daily_images": 0},
            "upstream": [],
        }
        weights = (await stack.client.get("/quota", headers=auth(key))).json()
        assert weights["limits"]["QUEUED_IMAGE_JOBS"] == 2 and weights["limits"]["DAILY_IMAGE_CREATIONS"] == 3
        assert weights["remaining"]["QUEUED_IMAGE_JOBS"] == 0 and weights["usage"]["DAILY_IMAGE_CREATIONS"] == 3
        assert (await stack.client.get("/api/quota", headers=auth(KEY_ALICE))).json()["limits"] == {
            "active_jobs": 40,
            "daily_images": 1500,
        }
        jobs = (await stack.client.get("/api/jobs", headers=auth(key))).json()
        assert jobs["total"] == 2

        # A user key is no admin.
        for method, path in (("GET", "/api/keys"), ("POST", "/api/keys"), ("DELETE", f"/api/keys/{key_id}")):
            body = {"name": "mine"} if method == "POST" else None
            assert_json_error(await stack.client.request(method, path, json=body, headers=auth(key)), 403)
        assert_json_error(await stack.client.post("/api/reset_queue", headers=auth(key)), 403)

        revoked = await imagebus_keys(database_url, "revoke", key_id)
        assert revoked.returncode == 0, revoked.stderr
        assert f"{KEY_CACHE_S:g} s" in revoked.stdout, revoked.stdout
        started = time.monotonic()
        while (await stack.client.get("/api/quota", headers=auth(key))).status_code == 200:
            assert time.monotonic() - started < CACHE_S + 1.0, "a revoked key still works past the cache time"
            await asyncio.sleep(0.05)
        assert_json_error(await stack.client.get("/api/jobs", headers=auth(key)), 401)
        listed = await imagebus_keys(database_url, "list")
        assert re.search(rf"^{key_id} .* \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC\s*$", listed.stdout, re.MULTILINE)
        unknown = await imagebus_keys(database_url, "revoke", "0" * 12)
        assert unknown.returncode == 1 and "no key" in unknown.stderr


async def test_admins_manage_keys_over_http(storage_config: S3Config, tiny_backend: Backend, tmp_path: Any) -> None:
    database_url = f"sqlite:///{tmp_path}/rm.db"
    async with running_stack(
        f"memory://keys-http-{uuid.uuid4().hex[:8]}", storage_config, database_url, tiny_backend, workers=0
    ) as stack:
        with structlog.testing.capture_logs() as logs:
            made = await stack.client.post("/api/keys", json={"name": "ops", "role": "admin"}, headers=auth(KEY_ADMIN))
        assert made.status_code == 201, made.text
        admin = made.json()
        assert KEY.match(admin["key"]) and admin["role"] == "admin" and "not be shown again" in admin["message"]
        assert [entry["key_id"] for entry in logs if entry["event"] == "api_key_created"] == [admin["id"]]
        assert admin["key"] not in repr(logs) and admin["key"].rsplit("_", 1)[-1] not in repr(logs)

        # A database admin key is an admin: it makes a user key with a quota of its own.
        made = await stack.client.post("/api/keys", json={"name": "user", "active_jobs": 1}, headers=auth(admin["key"]))
        assert made.status_code == 201, made.text
        user = made.json()
        assert user["role"] == "user" and user["owner"] == f"key_{user['id']}"
        assert (await submit(stack, user["key"], 1)).status_code == 202
        assert_json_error(await submit(stack, user["key"], 1), 429)
        assert_json_error(await stack.client.get("/api/keys", headers=auth(user["key"])), 403)

        listed = await stack.client.get("/api/keys", headers=auth(KEY_ADMIN))
        assert listed.status_code == 200
        assert [(k["name"], k["role"]) for k in listed.json()["keys"]] == [("ops", "admin"), ("user", "user")]
        for secret in (admin["key"], user["key"]):
            assert secret not in listed.text and secret.rsplit("_", 1)[-1] not in listed.text
        assert "key_hash" not in listed.text

        # The admin reads the user's jobs by owner id.
        theirs = await stack.client.get(f"/api/jobs?owner={user['owner']}", headers=auth(admin["key"]))
        assert theirs.status_code == 200 and theirs.json()["total"] == 1

        # Revoked here: refused at once by this replica (no cache wait).
        gone = await stack.client.delete(f"/api/keys/{user['id']}", headers=auth(KEY_ADMIN))
        assert gone.status_code == 200 and gone.json()["revoked_at"] is not None, gone.text
        assert_json_error(await stack.client.get("/api/quota", headers=auth(user["key"])), 401)
        assert_json_error(await stack.client.delete(f"/api/keys/{'f' * 12}", headers=auth(KEY_ADMIN)), 404)
        for bad in ({"name": ""}, {"name": "x", "role": "root"}, {"name": "x", "daily_images": -1}, {"nom": "x"}):
            assert_json_error(await stack.client.post("/api/keys", json=bad, headers=auth(KEY_ADMIN)), 400)
        assert_json_error(await stack.client.get("/api/keys"), 401)


@pytest.mark.parametrize("secret", [DEVELOPMENT_KEY_SECRET, "a-real-secret"])
def test_the_development_key_secret_is_warned_about(secret: str) -> None:
    # The settings' default is the value the warning looks for.
    assert IngressSettings.model_fields["key_secret"].default.get_secret_value() == DEVELOPMENT_KEY_SECRET
    assert KeysSettings.model_fields["key_secret"].default.get_secret_value() == DEVELOPMENT_KEY_SECRET
    with structlog.testing.capture_logs() as logs:
        KeyRing(("k",), secret)
    warned = [entry for entry in logs if entry["log_level"] == "warning" and "IMAGEBUS_KEY_SECRET" in entry["message"]]
    assert bool(warned) == (secret == DEVELOPMENT_KEY_SECRET), logs


def _presented(*headers: tuple[str, str]) -> str | None:
    scope: Any = {"type": "http", "headers": [(name.encode(), value.encode("latin-1")) for name, value in headers]}
    return presented_key(ASGIConnection(scope))


def test_the_key_is_read_from_x_api_key_first_then_a_bearer_authorization() -> None:
    assert _presented(("x-api-key", " sk-a "), ("authorization", "Bearer sk-b")) == "sk-a"
    assert _presented(("authorization", "bearer  sk-b ")) == "sk-b"  # the scheme in any case
    assert _presented(("x-api-key", "  "), ("authorization", "Bearer sk-b")) == "sk-b"  # a blank key is none
    assert _presented(("x-api-key", "sk-first"), ("x-api-key", "sk-second")) == "sk-first"
    assert _presented(("authorization", "Basic dXNlcjpwYXNz")) is None
    assert _presented(("authorization", "Bearer ")) is None
    assert _presented(("host", "example")) is None
