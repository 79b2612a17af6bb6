"""Seeds 000/001, the weights.gg unofficial API: ``/generateImage``, ``/search-loras``, ``/quota``.

``imageId`` is the job id; ``GET /status/{imageId}`` (``dialects/status.py``) answers in this
dialect's words. ``imageUrl`` is a signed link to the job's first image: its id is known at
submission, so the link is handed out at once and serves the image as soon as it is stored.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from litestar import Request, get
from litestar.params import FromQuery, QueryParameter
from pydantic import BaseModel, ValidationError

from ingress.auth import require_owner
from ingress.catalog_views import search_loras
from ingress.errors import ApiError
from ingress.jobs import idempotency_key_of
from ingress.openapi_responses import error_responses
from ingress.quota import usage_of, weights_quota
from ingress.routes.native import services_of
from ingress.services import Services
from projector.readside import JobRecord
from schemas import GenerateRequest, JobStatus, LoraRequest, image_id_for

TAGS = ["weights.gg (seeds 000/001)"]
MAX_QUERY_CHARS = 200
# Keys the README's quota example has under limits/remaining only (no usage): imagebus has none of them.
_LIMIT_ONLY_QUOTA_KEYS = ("CHAT_CONVERSATIONS", "CHAT_MESSAGES", "COVER_AUDIO_LENGTH_SECONDS")


def absolute_url(request: Request[Any, Any, Any], path: str) -> str:
    """``path`` (``/files/...``) as an absolute URL on the host the caller reached."""
    return str(request.base_url).rstrip("/") + path


def iso(moment: datetime) -> str:
    """UTC, ISO 8601 with a ``Z`` (what JavaScript's ``new Date()`` parses)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def status_word(status: JobStatus, step: int) -> str:
    """weights.gg's words: QUEUED, STARTING (no step yet), PENDING (rendering previews), COMPLETED, FAILED."""
    match status:
        case JobStatus.PENDING:
            return "QUEUED"
        case JobStatus.PROCESSING:
            return "PENDING" if step > 0 else "STARTING"
        case JobStatus.COMPLETED:
            return "COMPLETED"
        case _:
            return "FAILED"


def image_url(services: Services, request: Request[Any, Any, Any], job: JobRecord) -> str | None:
    """The first image's signed link: predicted while the job runs, null once there is nothing to fetch."""
    if job.images:
        view = services.jobs.image_view(job.images[0])
        return None if view.expired else absolute_url(request, view.file_url)
    if job.status.is_terminal():
        return None
    return absolute_url(request, services.jobs.signer.file_url(image_id_for(job.id, 0)))


def weights_status(services: Services, request: Request[Any, Any, Any], job: JobRecord) -> dict[str, Any]:
    """``GET /status/{imageId}`` for weights.gg clients."""
    word = status_word(job.status, job.step)
    error = None
    if word == "FAILED":
        error = job.error or ("canceled" if job.status is JobStatus.CANCELED else "No error description provided")
    return {
        "status": word,
        "prompt": job.params.prompt,
        "startTime": iso(job.created_at),
        "lastModifiedDate": iso(job.updated_at),
        "error": error,
        "imageId": job.id,
        "imageUrl": image_url(services, request, job),
        "progress": {"step": job.step, "total_steps": job.total_steps},
    }


class NotFound(BaseModel):
    """weights.gg's 404 for an unknown imageId; ``error`` repeats ``message`` for Chutes clients."""

    status: Literal["NOT_FOUND"] = "NOT_FOUND"
    message: str
    error: str


def not_found(image_id: str) -> dict[str, Any]:
    message = f"image {image_id} not found"
    return NotFound(message=message, error=message).model_dump()


def _request(prompt: str, lora_id: str | None) -> GenerateRequest:
    try:
        return GenerateRequest(prompt=prompt, loras=[LoraRequest(id=lora_id)] if lora_id else [])
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ApiError(400, f"invalid request: {problems}") from exc


@get(
    "/generateImage",
    tags=TAGS,
    summary="Queue an image (weights.gg): ?prompt=&loraName=",
    responses=error_responses(401, 409, 503),
)
async def generate_image(
    request: Request[Any, Any, Any],
    prompt: FromQuery[str | None] = None,
    lora_name: Annotated[str | None, QueryParameter(name="loraName")] = None,
) -> dict[str, Any]:
    services = services_of(request)
    principal = await require_owner(services.keyring, request)
    if prompt is None or not prompt.strip():
        raise ApiError(400, "prompt is required: /generateImage?prompt=<url-encoded prompt>")
    lora_id = None
    if lora_name and lora_name.strip():
        lora = services.config.catalog.lora(lora_name)
        if lora is None:
            raise ApiError(400, f"unknown LoRA {lora_name!r}; find one with /search-loras?query=")
        lora_id = lora.id
    accepted = await services.jobs.submit(
        _request(prompt, lora_id),
        principal.owner,
        dialect="weights",
        idempotency_key=idempotency_key_of(request),
        quota=principal.quota,
    )
    return {
        "success": True,
        "imageId": accepted.job_id,
        "imageUrl": absolute_url(request, services.jobs.signer.file_url(image_id_for(accepted.job_id, 0))),
        # Relative, as the weights.gg server answers it: its clients join it to the endpoint they call.
        "statusUrl": f"/status/{accepted.job_id}",
    }


@get(
    "/search-loras",
    tags=TAGS,
    summary="Search LoRAs by name, tag or trigger word (weights.gg)",
    responses=error_responses(401),
)
async def search_loras_route(
    request: Request[Any, Any, Any], text: Annotated[str | None, QueryParameter(name="query")] = None
) -> list[dict[str, Any]]:
    services = services_of(request)
    await require_owner(services.keyring, request)
    if text is None or not text.strip():
        raise ApiError(400, "query is required: /search-loras?query=<url-encoded search term>")
    if len(text) > MAX_QUERY_CHARS:
        raise ApiError(400, f"query must be at most {MAX_QUERY_CHARS} characters")
    return [lora.model_dump() for lora in search_loras(services.config.catalog, text).loras]


@get(
    "/quota",
    tags=TAGS,
    summary="Usage, limits and what remains (weights.gg shape)",
    responses=error_responses(401),
)
async def quota(request: Request[Any, Any, Any]) -> dict[str, Any]:
    services = services_of(request)
    principal = await require_owner(services.keyring, request)
    upstream = await services.read_model.upstream_quotas()
    body = weights_quota(await usage_of(services.read_model, principal.owner), principal.quota, upstream)
    for key in _LIMIT_ONLY_QUOTA_KEYS:
        body["limits"].setdefault(key, 0)
        body["remaining"].setdefault(key, 0)
    return body


weights_handlers = [generate_image, search_loras_route, quota]
