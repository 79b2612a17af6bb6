"""CyberImage (seed 003) under /api: what differs from the native API.

``/api/models``, ``/api/generate`` (``model_id`` + nested ``settings``), ``/api/queue``,
``/api/reset_queue`` and ``/api/enrich`` are the native routes, whose shapes are supersets of
CyberImage's; ``/api/gallery``, ``/api/image/{id}/metadata`` and ``DELETE /api/image/{id}`` are
second paths of the native image handlers (``ingress/routes/images.py``). Here: the status
vocabulary (no ``canceled``: a canceled job reads ``failed`` with its reason, so a polling
client still stops), the ``progress`` flags, and ``/api/get_image`` (always PNG).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from litestar import Request, Router, get
from litestar.params import FromPath
from litestar.response import Stream

from ingress.auth import require_owner
from ingress.images import image_id_from_filename, settings_of
from ingress.openapi_responses import error_responses, image_response
from ingress.routes.images import stream_of
from ingress.services import Services
from projector.readside import JobRecord
from schemas import JobStatus


def _services(request: Request[Any, Any, Any]) -> Services:
    services: Services = request.app.state.services
    return services


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def _status_word(status: JobStatus) -> str:
    return "failed" if status is JobStatus.CANCELED else status.value


def _progress(job: JobRecord) -> dict[str, Any]:
    processing = job.status is JobStatus.PROCESSING
    return {
        "preparing": job.status is JobStatus.PENDING,
        "loading_model": processing and job.step == 0,
        "generating": processing and 0 < job.step < job.total_steps,
        "saving": processing and job.step >= job.total_steps > 0,
        "completed": job.status is JobStatus.COMPLETED,
        "failed": job.status in (JobStatus.FAILED, JobStatus.CANCELED),
        "step": job.step,
        "total_steps": job.total_steps,
    }


def _message(job: JobRecord, position: int | None) -> str:
    images = job.params.num_images
    match job.status:
        case JobStatus.PENDING:
            return f"Waiting in queue ({position or 0} job(s) ahead)"
        case JobStatus.PROCESSING if job.step == 0:
            return "Loading model..."
        case JobStatus.PROCESSING:
            return f"Generating {images} image(s)... Step {job.step}/{job.total_steps}"
        case JobStatus.COMPLETED:
            return f"Generated {len(job.images)} image(s)"
        case JobStatus.CANCELED:
            return f"Canceled: {job.error}"
        case _:
            return f"Generation failed: {job.error}"


def status_view(services: Services, job: JobRecord, position: int | None) -> dict[str, Any]:
    params = job.params
    settings = settings_of(params)
    view: dict[str, Any] = {
        "id": job.id,
        "status": _status_word(job.status),
        "model_id": params.model,
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "settings": settings,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "completed_at": _iso(job.completed_at),
        "message": _message(job, position),
        "progress": _progress(job),
        "images": [
            {
                "id": image.id,
                "file_path": services.jobs.signer.file_url(image.id, image.content_type),
                "created_at": _iso(image.created_at),
                "expires_at": _iso(image.expires_at),
                "metadata": {
                    "model_id": params.model,
                    "prompt": params.prompt,
                    "negative_prompt": params.negative_prompt,
                    "settings": settings,
                    "seed": image.seed,
                    "image_number": image.index + 1,
                    "total_images": params.num_images,
                    "ignored_parameters": list(params.ignored_parameters),
                },
            }
            for image in job.images
        ],
    }
    if job.status in (JobStatus.FAILED, JobStatus.CANCELED):
        view["error_message"] = job.error
    return view


@get(
    "/status/{job_id:str}",
    summary="(CyberImage) a job's status with progress flags and images",
    responses=error_responses(401, 404),
)
async def status(request: Request[Any, Any, Any], job_id: FromPath[str]) -> dict[str, Any]:
    services = _services(request)
    owner = (await require_owner(services.keyring, request)).owner
    job = await services.jobs.job(job_id, owner)
    position = await services.read_model.queue_position(job) if job.status is JobStatus.PENDING else None
    return status_view(services, job, position)


@get(
    "/get_image/{image_id:str}",
    summary="(CyberImage) the image as PNG",
    responses={200: image_response("image/png"), **error_responses(401, 404, 410)},
)
async def get_image(request: Request[Any, Any, Any], image_id: FromPath[str]) -> Stream:
    services = _services(request)
    owner = (await require_owner(services.keyring, request)).owner
    image = await services.images.owned(image_id_from_filename(image_id), owner)
    return stream_of(await services.images.content(image, "png"))


cyberimage_router = Router(
    path="/api",
    route_handlers=[status, get_image],
    tags=["CyberImage (seed 003)"],
)
