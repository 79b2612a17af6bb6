"""``GET /status/{id}``, the one route seeds 000/001 (weights.gg) and 002 (Chutes) share.

A job answers in the dialect it was created through: Chutes' lower-case task, or weights.gg's
upper-case status (also for jobs made any other way). An id that is nobody's job, or another
owner's, is weights.gg's 404 ``NOT_FOUND`` (it carries ``error`` too, which Chutes clients read).
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from litestar.openapi import ResponseSpec
from litestar.params import FromPath

from ingress.auth import require_owner
from ingress.dialects.chutes import chutes_task
from ingress.dialects.weights import NotFound, not_found, weights_status
from ingress.errors import ApiError
from ingress.openapi_responses import error_responses
from ingress.routes.native import services_of


@get(
    "/status/{job_id:str}",
    tags=["weights.gg (seeds 000/001)", "Chutes proxy (seed 002)"],
    summary="A job's status",
    responses={
        **error_responses(401),
        404: ResponseSpec(NotFound, description="No such job for this key", generate_examples=False),
    },
)
async def job_status(request: Request[Any, Any, Any], job_id: FromPath[str]) -> Response[dict[str, Any]]:
    services = services_of(request)
    owner = (await require_owner(services.keyring, request)).owner
    try:
        job = await services.jobs.job(job_id, owner)
    except ApiError as exc:
        if exc.status_code != 404:
            raise
        return Response(not_found(job_id[:100]), status_code=404)
    if job.dialect == "chutes":
        return Response(chutes_task(services, request, job))
    return Response(weights_status(services, request, job))


status_handlers = [job_status]
