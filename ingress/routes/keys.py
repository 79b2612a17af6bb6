"""Admin routes for database API keys: ``GET /api/keys``, ``POST /api/keys``, ``DELETE /api/keys/{key_id}``.

The same operations as ``imagebus keys`` (``imagebus/keys_cli.py``), for admins without shell access.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from litestar import Request, Router, delete, get, post
from litestar.params import FromPath, JSONBody
from pydantic import BaseModel, ConfigDict, Field

from ingress.auth import require_admin
from ingress.errors import ApiError
from ingress.keys import ApiKey, Role
from ingress.openapi_responses import error_responses
from ingress.services import Services


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: str = Field(min_length=1, max_length=200)
    role: Role = "user"
    # Per-key quotas; left out: the ingress's defaults.
    daily_images: int | None = Field(None, ge=0, le=10_000_000)
    active_jobs: int | None = Field(None, ge=0, le=1_000_000)


class KeyView(BaseModel):
    id: str
    name: str
    role: Role
    # What the key's jobs and images are recorded under (GET /api/jobs?owner=).
    owner: str
    daily_images: int | None
    active_jobs: int | None
    created_at: datetime
    revoked_at: datetime | None


class IssuedKeyView(KeyView):
    key: str
    message: str


class KeyList(BaseModel):
    keys: list[KeyView]


def key_view(record: ApiKey) -> KeyView:
    return KeyView(
        id=record.id,
        name=record.name,
        role=record.role,
        owner=record.owner,
        daily_images=record.daily_images,
        active_jobs=record.active_jobs,
        created_at=record.created_at,
        revoked_at=record.revoked_at,
    )


def _services(request: Request[Any, Any, Any]) -> Services:
    services: Services = request.app.state.services
    return services


@get(
    "/",
    summary="(admin) Every database API key, revoked ones included; never the keys themselves",
    responses=error_responses(401, 403),
)
async def list_keys(request: Request[Any, Any, Any]) -> KeyList:
    services = _services(request)
    await require_admin(services.keyring, request)
    return KeyList(keys=[key_view(record) for record in await services.keys.list()])


@post(
    "/",
    status_code=201,
    summary="(admin) Make an API key; the answer is the only time it is shown",
    responses=error_responses(401, 403),
)
async def create_key(request: Request[Any, Any, Any], data: JSONBody[CreateKey]) -> IssuedKeyView:
    services = _services(request)
    await require_admin(services.keyring, request)
    issued = await services.keys.create(
        data.name, role=data.role, daily_images=data.daily_images, active_jobs=data.active_jobs
    )
    return IssuedKeyView(
        **key_view(issued.record).model_dump(),
        key=issued.key,
        message="Store this key now: it is kept only as a hash and will not be shown again.",
    )


@delete(
    "/{key_id:str}",
    status_code=200,
    summary="(admin) Revoke a key; other replicas stop taking it within seconds",
    responses=error_responses(401, 403, 404),
)
async def revoke_key(request: Request[Any, Any, Any], key_id: FromPath[str]) -> KeyView:
    services = _services(request)
    await require_admin(services.keyring, request)
    revoked = await services.keys.revoke(key_id)
    if revoked is None:
        raise ApiError(404, f"API key {key_id[:40]!r} not found")
    services.keyring.forget(key_id)
    return key_view(revoked)


keys_router = Router(path="/api/keys", route_handlers=[list_keys, create_key, revoke_key], tags=["admin"])
