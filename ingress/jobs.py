"""The native core every route and dialect goes through: submit a job, read it back."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime

import structlog

from bus import Bus
from ingress.errors import ApiError
from projector.readside import ImageRecord, JobRecord, ReadModel
from schemas import (
    Catalog,
    GenerateImage,
    GenerateRequest,
    GenerationParams,
    ImageView,
    JobAccepted,
    JobFailed,
    JobQueued,
    JobView,
    ModelSpec,
    new_id,
)
from schemas.api import Progress
from storage.object_store import ObjectStore

log = structlog.get_logger(__name__)

_ID = re.compile(r"^[0-9a-f]{32}$")


def valid_id(value: str) -> bool:
    return bool(_ID.match(value))


def resolve_params(catalog: Catalog, request: GenerateRequest) -> tuple[ModelSpec, GenerationParams]:
    """Fill catalog defaults and enforce the model's limits; raises ApiError(400) on bad input."""
    spec = catalog.get(request.model)
    if spec is None:
        known = ", ".join(sorted(catalog.models))
        raise ApiError(400, f"unknown model {request.model!r}; known models: {known}")
    width = request.width or spec.default_width
    height = request.height or spec.default_height
    steps = request.num_inference_steps or spec.default_steps
    for name, value, limit in (("width", width, spec.max_width), ("height", height, spec.max_height)):
        if value > limit:
            raise ApiError(400, f"{name} {value} exceeds the maximum {limit} of model {spec.id}")
        if value % 8:
            raise ApiError(400, f"{name} must be a multiple of 8, got {value}")
    if steps > spec.max_steps:
        raise ApiError(400, f"num_inference_steps {steps} exceeds the maximum {spec.max_steps} of {spec.id}")
    if request.num_images > spec.max_images:
        raise ApiError(400, f"num_images {request.num_images} exceeds the maximum {spec.max_images}")
    if request.negative_prompt and not spec.supports_negative_prompt:
        raise ApiError(400, f"model {spec.id} does not support negative_prompt")
    params = GenerationParams(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or None,
        model=spec.id,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=spec.default_guidance if request.guidance_scale is None else request.guidance_scale,
        seed=request.seed,
        num_images=request.num_images,
    )
    return spec, params


class JobService:
    def __init__(self, bus: Bus, read_model: ReadModel, store: ObjectStore, catalog: Catalog) -> None:
        self._bus = bus
        self._read_model = read_model
        self._store = store
        self._catalog = catalog

    async def submit(self, request: GenerateRequest, owner: str, dialect: str = "native") -> JobAccepted:
        spec, params = resolve_params(self._catalog, request)
        job_id = new_id()
        queued = JobQueued(job_id=job_id, owner=owner, backend=spec.backend, params=params, dialect=dialect)
        structlog.contextvars.bind_contextvars(job_id=job_id)
        try:
            # The event is durable before anything else, so the log always knows the job exists.
            await self._bus.publish_event(queued)
        except Exception as exc:
            log.error("publish_failed", error=str(exc))
            raise ApiError(503, "the message bus is unavailable; nothing was queued, try again") from exc
        command = GenerateImage(job_id=job_id, message_id=job_id, owner=owner, backend=spec.backend, params=params)
        # Read-your-writes: the row the projector will write anyway, written now, while the command
        # is already on its way to a worker (the row is insert-if-absent, so order does not matter).
        enqueued, recorded = await asyncio.gather(
            self._bus.publish_command(command), self._read_model.record_queued(queued), return_exceptions=True
        )
        if isinstance(enqueued, BaseException):
            log.error("enqueue_failed", error=str(enqueued))
            await self._bus.publish_event(JobFailed(job_id=job_id, error="could not be queued"))
            raise ApiError(503, "the message bus is unavailable; the job was not queued") from enqueued
        if isinstance(recorded, BaseException):
            raise recorded
        return JobAccepted(
            job_id=job_id, model=spec.id, created_at=queued.occurred_at, status_url=f"/api/jobs/{job_id}"
        )

    async def job(self, job_id: str, owner: str) -> JobRecord:
        record = await self._read_model.get_job(job_id, owner) if valid_id(job_id) else None
        if record is None:
            raise ApiError(404, f"job {job_id} not found")
        return record

    async def view(self, job_id: str, owner: str) -> JobView:
        return self.job_view(await self.job(job_id, owner))

    async def image(self, image_id: str, owner: str) -> ImageRecord:
        record = await self._read_model.get_image(image_id, owner) if valid_id(image_id) else None
        if record is None or record.state == "deleted":
            raise ApiError(404, f"image {image_id} not found")
        return record

    def job_view(self, job: JobRecord) -> JobView:
        params = job.params
        return JobView(
            id=job.id,
            status=job.status,
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            model=params.model,
            width=params.width,
            height=params.height,
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            seed=params.seed,
            num_images=params.num_images,
            created_at=job.created_at,
            started_at=job.started_at,
            completed_at=job.completed_at,
            progress=Progress(step=job.step, total_steps=job.total_steps),
            images=[self.image_view(image) for image in job.images],
            error=job.error,
        )

    def image_view(self, image: ImageRecord) -> ImageView:
        now = datetime.now(UTC)
        expired = image.state == "expired" or image.expires_at <= now
        return ImageView(
            id=image.id,
            url=None if expired else self._store.presigned_get_url(image.object_key, image.expires_at, now),
            download_url=f"/api/images/{image.id}",
            expires_at=image.expires_at,
            expired=expired,
            width=image.width,
            height=image.height,
            seed=image.seed,
            content_type=image.content_type,
        )
