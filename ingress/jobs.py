"""The native core every route and dialect goes through: submit a job, read it back."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import structlog
from litestar import Request

from bus import Bus
from ingress.config import QuotaLimits
from ingress.errors import ApiError
from ingress.links import LinkSigner
from ingress.live import LiveProgress
from ingress.presigned import PresignedUrls
from projector.queries import day_start
from projector.readside import ImageRecord, JobRecord, ReadModel
from schemas import (
    CancelJob,
    Catalog,
    GenerateImage,
    GenerateRequest,
    GenerationParams,
    ImageView,
    JobAccepted,
    JobFailed,
    JobQueued,
    JobView,
    LoraRequest,
    ModelSpec,
    new_id,
)
from schemas.api import CancelResult, Progress
from schemas.metrics import JOBS_SUBMITTED
from storage.object_store import ObjectStore

log = structlog.get_logger(__name__)

_ID = re.compile(r"^[0-9a-f]{32}$")
# How long POST /cancel waits to answer with the final `canceled` (a running job stops between steps).
CANCEL_WAIT_S = 3.0


def valid_id(value: str) -> bool:
    return bool(_ID.match(value))


def normalized_id(value: str) -> str:
    """Ids are 32 hex digits; the dashed UUID form seed clients may print is accepted too."""
    candidate = value.strip().lower()
    if len(candidate) == 36 and candidate.count("-") == 4:
        candidate = candidate.replace("-", "")
    return candidate


def resolve_params(
    catalog: Catalog, request: GenerateRequest, *, lenient_negative_prompt: bool = False
) -> tuple[ModelSpec, GenerationParams]:
    """Fill catalog defaults and enforce the model's limits; raises ApiError(400) on bad input.

    ``lenient_negative_prompt``: drop (and record) a negative prompt the model cannot use instead
    of refusing it, as CyberImage documents for its Flux models.
    """
    spec = catalog.get(request.model)
    if spec is None:
        known = ", ".join(sorted(catalog.models))
        raise ApiError(400, f"unknown model {request.model!r}; known models: {known}")
    width = request.width or spec.default_width
    height = request.height or spec.default_height
    steps = request.num_inference_steps or spec.default_steps
    # Flux packs 2x2 latent patches over an 8x VAE: its sizes step by 16 (it would silently round down).
    multiple = 16 if spec.family == "flux" else 8
    for name, value, limit in (("width", width, spec.max_width), ("height", height, spec.max_height)):
        if value > limit:
            raise ApiError(400, f"{name} {value} exceeds the maximum {limit} of model {spec.id}")
        if value % multiple:
            raise ApiError(400, f"{name} must be a multiple of {multiple} for model {spec.id}, got {value}")
    if steps > spec.max_steps:
        raise ApiError(400, f"num_inference_steps {steps} exceeds the maximum {spec.max_steps} of {spec.id}")
    if request.num_images > spec.max_images:
        raise ApiError(400, f"num_images {request.num_images} exceeds the maximum {spec.max_images}")
    ignored: tuple[str, ...] = ()
    negative_prompt = request.negative_prompt or None
    if negative_prompt and not spec.supports_negative_prompt:
        if not lenient_negative_prompt:
            raise ApiError(400, f"model {spec.id} does not support negative_prompt")
        negative_prompt, ignored = None, ("negative_prompt",)
    guidance = spec.default_guidance if request.guidance_scale is None else request.guidance_scale
    if guidance != spec.default_guidance and not spec.supports_guidance:
        # Distilled models (turbo, schnell) ignore guidance: refuse rather than pretend.
        raise ApiError(
            400, f"model {spec.id} does not use guidance_scale (leave it out or send {spec.default_guidance})"
        )
    loras = _resolve_loras(catalog, spec, request.loras)
    params = GenerationParams(
        prompt=request.prompt,
        negative_prompt=negative_prompt,
        model=spec.id,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=guidance,
        seed=request.seed,
        num_images=request.num_images,
        loras=loras,
        ignored_parameters=ignored,
    )
    return spec, params


def _resolve_loras(catalog: Catalog, spec: ModelSpec, wanted: list[LoraRequest]) -> tuple[LoraRequest, ...]:
    """Catalog ids for the requested LoRAs; any that cannot be applied is a 400, never dropped."""
    if not wanted:
        return ()
    if not spec.supports_lora:
        raise ApiError(400, f"model {spec.id} does not support LoRAs")
    resolved = []
    for request in wanted:
        lora = catalog.lora(request.id)
        if lora is None:
            raise ApiError(400, f"unknown LoRA {request.id!r}; search them with GET /api/loras?query=")
        if lora.models and spec.id not in lora.models:
            raise ApiError(400, f"LoRA {lora.id} does not apply to model {spec.id} (only {', '.join(lora.models)})")
        resolved.append(request.model_copy(update={"id": lora.id}))
    return tuple(resolved)


_QUEUE_DEPTH_TTL_S = 1.0
_IDEMPOTENCY_NAMESPACE = uuid.UUID("5f0c7c1e-6a57-4c55-9b1e-1f1d0e7a9c42")
MAX_IDEMPOTENCY_KEY_CHARS = 255


def idempotency_key_of(request: Request[Any, Any, Any]) -> str | None:
    """The request's ``Idempotency-Key`` header, if it has one."""
    return request.headers.get("idempotency-key")


def fixed_job_id(owner: str, job_id: str | None, idempotency_key: str | None) -> str | None:
    """The job id a PUT names (a UUID), or the one an Idempotency-Key stands for (per owner)."""
    if job_id is not None:
        normalized = normalized_id(job_id)
        if not valid_id(normalized):
            raise ApiError(400, f"job id {job_id!r} must be a UUID (32 hex digits, dashes allowed)")
        return normalized
    if idempotency_key is None:
        return None
    if not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS or not idempotency_key.isprintable():
        raise ApiError(400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable characters")
    # Scoped by owner: two keys' clients choosing the same Idempotency-Key get different jobs.
    return uuid.uuid5(_IDEMPOTENCY_NAMESPACE, f"{owner}\n{idempotency_key}").hex


def _replayed(existing: JobRecord, owner: str, params: GenerationParams, dialect: str) -> JobAccepted:
    """The answer to a repeated submit: the same job if the request is the same, else 409."""
    if existing.owner != owner:
        raise ApiError(409, f"job id {existing.id} is already in use; choose another")
    if existing.params != params or existing.dialect != dialect:
        raise ApiError(409, f"job {existing.id} was submitted with a different request; use a new key or id")
    return JobAccepted(
        job_id=existing.id,
        status=existing.status,
        model=existing.params.model,
        num_images=existing.params.num_images,
        created_at=existing.created_at,
        status_url=f"/api/jobs/{existing.id}",
        message=f"Job already submitted with this id ({existing.status.value})",
    )


class JobService:
    def __init__(
        self,
        bus: Bus,
        read_model: ReadModel,
        store: ObjectStore,
        catalog: Catalog,
        signer: LinkSigner,
        quota: QuotaLimits,
        progress: LiveProgress | None = None,
    ) -> None:
        self._bus = bus
        self._read_model = read_model
        self._store = store
        self._catalog = catalog
        self._quota = quota
        self.signer = signer
        self._presigned = PresignedUrls(store)
        # Live steps of running jobs (never in the read model), laid over what it says.
        self.progress = LiveProgress() if progress is None else progress
        # Per queue: when the broker was last asked for its depth, and the depth since counted up.
        self._queue_depths: dict[str, tuple[float, int]] = {}

    async def submit(
        self,
        request: GenerateRequest,
        owner: str,
        dialect: str = "native",
        *,
        job_id: str | None = None,
        idempotency_key: str | None = None,
        quota: QuotaLimits | None = None,
    ) -> JobAccepted:
        """Queue a job. With a client-chosen ``job_id`` (PUT) or an ``idempotency_key`` the same
        request again answers the same job, and another request under that id gets 409.
        ``quota``: the caller's key's limits (the ingress's defaults when None)."""
        spec, params = resolve_params(self._catalog, request, lenient_negative_prompt=dialect == "cyberimage")
        fixed_id = fixed_job_id(owner, job_id, idempotency_key)
        if fixed_id is not None:
            existing = await self._read_model.get_job(fixed_id, None)
            if existing is not None:
                return _replayed(existing, owner, params, dialect)
        await self._check_quota(owner, params.num_images, quota or self._quota)
        await self._check_queue_depth(spec.queue)
        job_id = fixed_id or new_id()
        queued = JobQueued(job_id=job_id, owner=owner, backend=spec.backend, params=params, dialect=dialect)
        structlog.contextvars.bind_contextvars(job_id=job_id)
        try:
            # The event is durable before anything else, so the log always knows the job exists.
            await self._bus.publish_event(queued)
        except Exception as exc:
            log.error("publish_failed", error=str(exc))
            raise ApiError(503, "the message bus is unavailable; nothing was queued, try again") from exc
        command = GenerateImage(
            job_id=job_id, message_id=job_id, owner=owner, backend=spec.backend, pool=spec.pool, params=params
        )
        if fixed_id is not None and not await self._read_model.record_queued(queued):
            # A concurrent submit of the same id got there first and publishes the command itself.
            twin = await self._read_model.get_job(job_id, None)
            assert twin is not None  # its row is what made ours lose
            return _replayed(twin, owner, params, dialect)
        # Read-your-writes: the row the projector will write anyway, written now, while the command
        # is already on its way to a worker (the row is insert-if-absent, so order does not matter).
        enqueued, recorded = await asyncio.gather(
            self._bus.publish_command(command), self._read_model.record_queued(queued), return_exceptions=True
        )
        if isinstance(enqueued, BaseException):
            log.error("enqueue_failed", error=str(enqueued))
            try:
                await self._bus.publish_event(JobFailed(job_id=job_id, error="could not be queued"))
            except Exception as exc:  # still the bus's fault: the client gets the same 503
                log.error("enqueue_failure_not_recorded", error=str(exc))
            raise ApiError(503, "the message bus is unavailable; the job was not queued") from enqueued
        if isinstance(recorded, BaseException):
            raise recorded
        JOBS_SUBMITTED.labels(spec.backend, params.model).inc()
        log.info("job_submitted", backend=spec.backend, model=params.model, queue=spec.queue)
        return JobAccepted(
            job_id=job_id,
            model=spec.id,
            num_images=params.num_images,
            created_at=queued.occurred_at,
            status_url=f"/api/jobs/{job_id}",
            message=f"Image generation job submitted successfully for {params.num_images} image(s)",
        )

    async def _check_queue_depth(self, queue: str) -> None:
        """429 when the queue already holds ``max_queue_depth`` commands (asked of the broker at most
        once a second per queue, so a burst may overshoot by what arrives in that second)."""
        now = time.monotonic()
        checked = self._queue_depths.get(queue)
        if checked is None or now - checked[0] > _QUEUE_DEPTH_TTL_S:
            try:
                depth = await self._bus.command_backlog(queue)
            except Exception as exc:  # the publish right after will say what is wrong with the bus
                log.warning("queue_depth_unknown", queue=queue, error=str(exc))
                return
            checked = (now, depth)
            self._queue_depths[queue] = checked
        else:
            # Count our own submits since the reading, so one replica cannot overshoot by a burst.
            checked = (checked[0], checked[1] + 1)
            self._queue_depths[queue] = checked
        limit = self._quota.max_queue_depth
        if checked[1] >= limit:
            raise ApiError(
                429,
                f"the queue for {queue} is full ({checked[1]} jobs waiting, limit {limit}); try again later",
                headers={"Retry-After": "10"},
            )

    async def _check_quota(self, owner: str, num_images: int, quota: QuotaLimits) -> None:
        now = datetime.now(UTC)
        usage = await self._read_model.usage(owner, now.date())
        if usage.active_jobs >= quota.active_jobs:
            raise ApiError(
                429,
                f"quota: {usage.active_jobs} jobs already queued or running (limit {quota.active_jobs}); "
                "wait for one to finish",
                headers={"Retry-After": "5"},
            )
        if usage.images_since + num_images > quota.daily_images:
            midnight = day_start(now).timestamp() + 86400
            raise ApiError(
                429,
                f"quota: {usage.images_since} of {quota.daily_images} daily images used; "
                f"{num_images} more would exceed it",
                headers={"Retry-After": str(max(1, int(midnight - now.timestamp())))},
            )

    async def job(self, job_id: str, owner: str | None) -> JobRecord:
        """The owner's job (``owner=None``: anyone's, for admins), with its live step; 404 for any other."""
        job_id = normalized_id(job_id)
        record = await self._read_model.get_job(job_id, owner) if valid_id(job_id) else None
        if record is None:
            raise ApiError(404, f"job {job_id} not found")
        return self.progress.overlay(record)

    async def cancel(self, job_id: str, owner: str) -> CancelResult:
        """Ask the job's workers to stop it; a pending job is dropped by whichever worker takes it.

        Only a worker emits the terminal event (one ack point, exactly one terminal state), so
        this waits a moment for it and otherwise answers with the job still on its way out.
        """
        job = await self.job(job_id, owner)
        if job.status.is_terminal():
            raise ApiError(409, f"job {job.id} already ended: {job.status.value}")
        try:
            await self._bus.publish_control(CancelJob(job_id=job.id, backend=job.backend))
        except Exception as exc:
            raise ApiError(503, "the message bus is unavailable; the job was not canceled, try again") from exc
        log.info("cancel_requested", job_id=job.id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_WAIT_S
        while not job.status.is_terminal() and loop.time() < deadline:
            await asyncio.sleep(0.05)
            job = await self.job(job.id, owner)
        message = "Job canceled" if job.status.is_terminal() else "Cancel requested; the job stops at its next step"
        return CancelResult(job_id=job.id, status=job.status, message=message)

    async def view(self, job_id: str, owner: str | None) -> JobView:
        return self.job_view(await self.job(job_id, owner))

    async def image(self, image_id: str, owner: str) -> ImageRecord:
        image_id = normalized_id(image_id)
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
            loras=list(params.loras),
            error=job.error,
        )

    def image_view(self, image: ImageRecord) -> ImageView:
        now = datetime.now(UTC)
        expired = image.state == "expired" or image.expires_at <= now
        return ImageView(
            id=image.id,
            url=None if expired else self._presigned.get(image.object_key, image.expires_at, now),
            download_url=f"/api/images/{image.id}",
            file_url=self.signer.file_url(image.id, image.content_type),
            thumb_url=self.signer.thumb_url(image.id),
            expires_at=image.expires_at,
            expired=expired,
            width=image.width,
            height=image.height,
            seed=image.seed,
            content_type=image.content_type,
        )
