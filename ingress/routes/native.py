"""The native API under /api."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Literal

from litestar import Request, Router, get, post
from litestar.params import FromPath, FromQuery, JSONBody
from litestar.response import Response, Stream

from ingress.auth import require_owner
from ingress.catalog_views import info, model_list
from ingress.errors import ApiError
from ingress.routes.sse import job_events
from ingress.services import Services
from schemas import GenerateRequest, JobAccepted, JobStatus, JobView
from schemas.api import JobList, ModelList
from storage.object_store import ObjectMissing

MAX_PAGE_SIZE = 50
_FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def _services(request: Request[Any, Any, Any]) -> Services:
    services: Services = request.app.state.services
    return services


@post("/generate", status_code=202, summary="Queue a text-to-image job")
async def generate(request: Request[Any, Any, Any], data: JSONBody[GenerateRequest]) -> JobAccepted:
    services = _services(request)
    owner = require_owner(services.keyring, request)
    return await services.jobs.submit(data, owner)


@get("/jobs/{job_id:str}", summary="A job's status, progress and images")
async def get_job(request: Request[Any, Any, Any], job_id: FromPath[str]) -> JobView:
    services = _services(request)
    owner = require_owner(services.keyring, request)
    return await services.jobs.view(job_id, owner)


@get("/jobs", summary="The caller's jobs, newest first, paginated")
async def list_jobs(
    request: Request[Any, Any, Any],
    status: FromQuery[JobStatus | None] = None,
    page: FromQuery[int] = 1,
    limit: FromQuery[int] = 20,
) -> JobList:
    services = _services(request)
    owner = require_owner(services.keyring, request)
    if page < 1:
        raise ApiError(400, "page must be 1 or more")
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ApiError(400, f"limit must be between 1 and {MAX_PAGE_SIZE}")
    records, total = await services.read_model.list_jobs(owner, status=status, offset=(page - 1) * limit, limit=limit)
    return JobList(jobs=[services.jobs.job_view(r) for r in records], page=page, limit=limit, total=total)


@get("/models", summary="The model catalog")
async def models(request: Request[Any, Any, Any]) -> ModelList:
    return model_list(_services(request).config.catalog)


@get("/info", summary="JSON schema of the generation parameters of each model")
async def parameters_info(request: Request[Any, Any, Any]) -> dict[str, Any]:
    return info(_services(request).config.catalog)


@get("/images/{image_id:str}", summary="The image bytes (PNG unless ?format=jpeg|webp)")
async def get_image(
    request: Request[Any, Any, Any],
    image_id: FromPath[str],
    format: FromQuery[Literal["png", "jpeg", "webp"] | None] = None,
) -> Response[Any]:
    services = _services(request)
    owner = require_owner(services.keyring, request)
    image_id = image_id.removesuffix(".png")
    image = await services.jobs.image(image_id, owner)
    if image.state == "expired" or image.expires_at <= datetime.now(UTC):
        raise ApiError(410, f"image {image_id} expired at {image.expires_at.isoformat()}")
    try:
        chunks = await _opened(services.store.get_stream(image.object_key))
    except ObjectMissing as exc:
        raise ApiError(410, f"image {image_id} is no longer stored") from exc
    wanted = _FORMATS.get(format or "", image.content_type)
    headers = {"Cache-Control": "private, max-age=60"}
    if wanted == image.content_type:
        return Stream(chunks, media_type=image.content_type, headers=headers)
    data = b"".join([chunk async for chunk in chunks])
    converted = await asyncio.to_thread(_convert, data, format or "png")
    return Response(converted, media_type=wanted, headers=headers)


async def _opened(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Read the first chunk now, so a missing object becomes an error before headers are sent."""
    first = await anext(chunks, b"")

    async def replay() -> AsyncIterator[bytes]:
        yield first
        async for chunk in chunks:
            yield chunk

    return replay()


def _convert(data: bytes, fmt: str) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, format=fmt.upper())
        return out.getvalue()


native_router = Router(
    path="/api",
    route_handlers=[generate, get_job, list_jobs, models, parameters_info, get_image, job_events],
    tags=["native"],
)
