"""The native API under /api: jobs, catalog, queue, prompts, quota. Images: ``routes/images.py``."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, Router, get, post, put
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from ingress.auth import require_admin, require_owner
from ingress.catalog_views import info, model_list, search_loras
from ingress.enrich import enrich
from ingress.errors import ApiError
from ingress.images import check_page
from ingress.jobs import idempotency_key_of
from ingress.openapi_responses import error_responses
from ingress.queue import queue_stats, reset_stalled
from ingress.quota import native_quota, usage_of
from ingress.routes.images import native_image_handlers
from ingress.routes.sse import gallery_events, job_events
from ingress.services import Services
from schemas import JobAccepted, JobStatus, JobView
from schemas.api import (
    CancelResult,
    EnrichRequest,
    EnrichResult,
    GenerateBody,
    JobList,
    LoraList,
    ModelList,
    QueueStats,
    Quota,
    ResetResult,
)


def services_of(request: Request[Any, Any, Any]) -> Services:
    services: Services = request.app.state.services
    return services


def _dialect_of(data: GenerateBody) -> str:
    return "cyberimage" if data.model_id is not None or data.settings is not None else "native"


@post(
    "/generate",
    status_code=202,
    summary="Queue a text-to-image job (flat fields, or model_id + settings); Idempotency-Key honoured",
    responses=error_responses(401, 409, 503),
)
async def generate(request: Request[Any, Any, Any], data: JSONBody[GenerateBody]) -> JobAccepted:
    services = services_of(request)
    principal = await require_owner(services.keyring, request)
    return await services.jobs.submit(
        data.to_request(),
        principal.owner,
        dialect=_dialect_of(data),
        idempotency_key=idempotency_key_of(request),
        quota=principal.quota,
    )


@put(
    "/jobs/{job_id:str}",
    status_code=202,
    summary="Queue a job under a client-chosen id (a UUID); idempotent",
    responses=error_responses(401, 409, 503),
)
async def put_job(request: Request[Any, Any, Any], job_id: FromPath[str], data: JSONBody[GenerateBody]) -> JobAccepted:
    services = services_of(request)
    principal = await require_owner(services.keyring, request)
    return await services.jobs.submit(
        data.to_request(), principal.owner, dialect=_dialect_of(data), job_id=job_id, quota=principal.quota
    )


@get(
    "/jobs/{job_id:str}",
    summary="A job's status, progress and images (admins: anyone's job)",
    responses=error_responses(401, 404),
)
async def get_job(request: Request[Any, Any, Any], job_id: FromPath[str]) -> JobView:
    services = services_of(request)
    principal = await require_owner(services.keyring, request)
    return await services.jobs.view(job_id, None if principal.is_admin else principal.owner)


@post(
    "/jobs/{job_id:str}/cancel",
    status_code=200,
    summary="Cancel a pending or running job",
    responses=error_responses(401, 404, 409, 503),
)
async def cancel_job(request: Request[Any, Any, Any], job_id: FromPath[str]) -> CancelResult:
    services = services_of(request)
    owner = (await require_owner(services.keyring, request)).owner
    return await services.jobs.cancel(job_id, owner)


@get(
    "/jobs",
    summary="The caller's jobs, newest first, paginated (admins: ?owner=<owner id> for another's)",
    responses=error_responses(401, 403),
)
async def list_jobs(
    request: Request[Any, Any, Any],
    status: FromQuery[JobStatus | None] = None,
    page: FromQuery[int] = 1,
    limit: FromQuery[int] = 20,
    of_owner: Annotated[str | None, QueryParameter(name="owner")] = None,
) -> JobList:
    services = services_of(request)
    principal = await require_owner(services.keyring, request)
    if of_owner is not None and not principal.is_admin:
        raise ApiError(403, "only an admin key may list another owner's jobs")
    owner = of_owner or principal.owner
    check_page(page, limit)
    records, total = await services.read_model.list_jobs(owner, status=status, offset=(page - 1) * limit, limit=limit)
    views = [services.jobs.job_view(services.jobs.progress.overlay(record)) for record in records]
    return JobList(jobs=views, page=page, limit=limit, total=total)


@get("/models", summary="The model catalog", responses=error_responses())
async def models(request: Request[Any, Any, Any]) -> ModelList:
    return model_list(services_of(request).config.catalog)


@get(
    "/info",
    summary="JSON schema of the generation parameters of each model, and its LoRAs",
    responses=error_responses(),
)
async def parameters_info(request: Request[Any, Any, Any]) -> dict[str, Any]:
    return info(services_of(request).config.catalog)


@get("/loras", summary="Search the LoRA catalog by id, name, tag or trigger word", responses=error_responses())
async def loras(request: Request[Any, Any, Any], text: Annotated[str, QueryParameter(name="query")] = "") -> LoraList:
    if len(text) > 200:
        raise ApiError(400, "query must be at most 200 characters")
    return search_loras(services_of(request).config.catalog, text)


@get("/quota", summary="The caller's usage, limits and what remains", responses=error_responses(401))
async def quota(request: Request[Any, Any, Any]) -> Quota:
    services = services_of(request)
    principal = await require_owner(services.keyring, request)
    upstream = await services.read_model.upstream_quotas()
    return native_quota(await usage_of(services.read_model, principal.owner), principal.quota, upstream)


@get(
    "/queue",
    summary="Jobs by status; with detailed=true also the last 24 h, per model, timings",
    responses=error_responses(401),
)
async def queue(request: Request[Any, Any, Any], detailed: FromQuery[bool] = False) -> QueueStats:
    services = services_of(request)
    await require_owner(services.keyring, request)
    return await queue_stats(services.read_model, detailed=detailed)


@post(
    "/reset_queue",
    status_code=200,
    summary="(admin) Put stalled jobs back to pending and re-publish them",
    responses=error_responses(401, 403, 503),
)
async def reset_queue(request: Request[Any, Any, Any]) -> ResetResult:
    services = services_of(request)
    await require_admin(services.keyring, request)
    return await reset_stalled(
        services.bus, services.read_model, services.config.catalog, stall_after_s=services.config.stall_after_s
    )


@post(
    "/enrich",
    status_code=200,
    summary="Enrich a prompt in a style (templates, or a configured chat model)",
    responses=error_responses(401),
)
async def enrich_prompt(request: Request[Any, Any, Any], data: JSONBody[EnrichRequest]) -> EnrichResult:
    services = services_of(request)
    await require_owner(services.keyring, request)
    return await enrich(data.prompt, data.style, services.config.enrich)


native_router = Router(
    path="/api",
    route_handlers=[
        generate,
        put_job,
        get_job,
        cancel_job,
        list_jobs,
        models,
        parameters_info,
        loras,
        quota,
        queue,
        reset_queue,
        enrich_prompt,
        job_events,
        gallery_events,
        *native_image_handlers,
    ],
    tags=["native"],
)
