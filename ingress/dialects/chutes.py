"""Seed 002, the Chutes image proxy: ``POST /generate`` and ``GET /status`` (the task list).

``GET /status/{id}`` (``dialects/status.py``) answers jobs made here in this shape. ``file_path``
is the absolute, signed link to the first image (no key needed), where the proxy had a local path.
Task ids are printed as dashed UUIDs, as the proxy's ``uuid-v4-string``; both forms are accepted.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from litestar import Request, Response, get, post
from litestar.params import FromQuery, JSONBody
from pydantic import BaseModel, ConfigDict, Field

from ingress.auth import require_owner
from ingress.dialects.weights import absolute_url
from ingress.errors import ApiError
from ingress.images import check_page
from ingress.jobs import idempotency_key_of
from ingress.openapi_responses import error_responses
from ingress.routes.native import services_of
from ingress.services import Services
from projector.readside import JobRecord
from schemas import GenerateRequest, JobStatus
from schemas.api import MAX_NEGATIVE_PROMPT_CHARS, MAX_PROMPT_CHARS

TAGS = ["Chutes proxy (seed 002)"]
ChutesStatus = Literal["pending", "processing", "completed", "failed"]
DEFAULT_LIMIT = 50
# Past this, page * limit stops being an offset any database takes.
MAX_PAGE = 1_000_000


class ChutesGenerate(BaseModel):
    """The proxy's body: only ``prompt`` is required (``negative_prompt`` and ``seed`` also taken)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(None, max_length=200)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    width: int | None = Field(None, ge=8, le=4096)
    height: int | None = Field(None, ge=8, le=4096)
    num_inference_steps: int | None = Field(None, ge=1, le=500)
    negative_prompt: str | None = Field(None, max_length=MAX_NEGATIVE_PROMPT_CHARS)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


def task_id(job_id: str) -> str:
    return str(uuid.UUID(hex=job_id))


def sql_time(moment: datetime) -> str:
    """``YYYY-MM-DD HH:MM:SS`` in UTC, as SQLite's CURRENT_TIMESTAMP prints it."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def status_word(status: JobStatus) -> str:
    return "failed" if status is JobStatus.CANCELED else status.value


def chutes_task(services: Services, request: Request[Any, Any, Any], job: JobRecord) -> dict[str, Any]:
    file_path = None
    if job.images:
        view = services.jobs.image_view(job.images[0])
        file_path = None if view.expired else absolute_url(request, view.file_url)
    word = status_word(job.status)
    error = (job.error or job.status.value) if word == "failed" else None
    return {
        "id": task_id(job.id),
        "prompt": job.params.prompt,
        "status": word,
        "file_path": file_path,
        "error": error,
        "created_at": sql_time(job.created_at),
        "updated_at": sql_time(job.updated_at),
    }


@post(
    "/generate",
    status_code=200,
    tags=TAGS,
    summary="Queue an image (Chutes proxy)",
    responses=error_responses(401, 409, 503),
)
async def generate(request: Request[Any, Any, Any], data: JSONBody[ChutesGenerate]) -> dict[str, str]:
    services = services_of(request)
    principal = await require_owner(services.keyring, request)
    accepted = await services.jobs.submit(
        GenerateRequest.model_validate(data.model_dump(exclude_none=True)),
        principal.owner,
        dialect="chutes",
        idempotency_key=idempotency_key_of(request),
        quota=principal.quota,
    )
    return {"id": task_id(accepted.job_id), "status": "pending", "message": "Task queued successfully"}


async def _page(
    services: Services, owner: str, status: ChutesStatus | None, offset: int, limit: int
) -> tuple[list[JobRecord], int]:
    read_model = services.read_model
    if status != "failed":
        return await read_model.list_jobs(
            owner, status=JobStatus(status) if status else None, offset=offset, limit=limit
        )
    # "failed" is failed or canceled here: the first offset+limit of each, merged newest first.
    failed, failed_total = await read_model.list_jobs(owner, status=JobStatus.FAILED, offset=0, limit=offset + limit)
    canceled, canceled_total = await read_model.list_jobs(
        owner, status=JobStatus.CANCELED, offset=0, limit=offset + limit
    )
    merged = sorted([*failed, *canceled], key=lambda job: (-job.created_at.timestamp(), job.id))
    return merged[offset : offset + limit], failed_total + canceled_total


@get(
    "/status",
    tags=TAGS,
    summary="The caller's tasks, newest first (Chutes proxy); ?status=&page=&limit=",
    responses=error_responses(401),
)
async def list_tasks(
    request: Request[Any, Any, Any],
    status: FromQuery[ChutesStatus | None] = None,
    page: FromQuery[int] = 1,
    limit: FromQuery[int] = DEFAULT_LIMIT,
) -> Response[list[dict[str, Any]]]:
    services = services_of(request)
    owner = (await require_owner(services.keyring, request)).owner
    check_page(page, limit)
    if page > MAX_PAGE:
        raise ApiError(400, f"page must be at most {MAX_PAGE}")
    records, total = await _page(services, owner, status, (page - 1) * limit, limit)
    return Response(
        [chutes_task(services, request, job) for job in records],
        headers={"X-Total-Count": str(total), "X-Page": str(page), "X-Limit": str(limit)},
    )


chutes_handlers = [generate, list_tasks]
