"""Shapes of the native REST API (requests and responses)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.messages import LoraRequest
from schemas.status import JobStatus

MAX_PROMPT_CHARS = 2000
MAX_NEGATIVE_PROMPT_CHARS = 500


class GenerateRequest(BaseModel):
    """POST /api/generate. Unset fields take the model's defaults from the catalog."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(None, max_length=MAX_NEGATIVE_PROMPT_CHARS)
    model: str | None = Field(None, max_length=200)
    width: int | None = Field(None, ge=8, le=4096)
    height: int | None = Field(None, ge=8, le=4096)
    num_inference_steps: int | None = Field(None, ge=1, le=500)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    num_images: int = Field(1, ge=1, le=8)
    loras: list[LoraRequest] = Field(default_factory=list, max_length=8)


class GenerateSettings(BaseModel):
    """The nested ``settings`` of CyberImage-style requests (seed 003)."""

    model_config = ConfigDict(extra="forbid")

    num_images: int | None = Field(None, ge=1, le=8)
    num_inference_steps: int | None = Field(None, ge=1, le=500)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    height: int | None = Field(None, ge=8, le=4096)
    width: int | None = Field(None, ge=8, le=4096)
    # Accepted for compatibility; only sequence-length-aware pipelines would use it.
    max_sequence_length: int | None = Field(None, ge=1, le=4096)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


class GenerateBody(BaseModel):
    """POST /api/generate as any client sends it: native/txt2img flat fields, or CyberImage's
    ``model_id`` + nested ``settings``. ``to_request()`` folds both into one GenerateRequest."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(None, max_length=MAX_NEGATIVE_PROMPT_CHARS)
    model: str | None = Field(None, max_length=200)
    model_id: str | None = Field(None, max_length=200)
    width: int | None = Field(None, ge=8, le=4096)
    height: int | None = Field(None, ge=8, le=4096)
    num_inference_steps: int | None = Field(None, ge=1, le=500)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    num_images: int | None = Field(None, ge=1, le=8)
    loras: list[LoraRequest] = Field(default_factory=list, max_length=8)
    settings: GenerateSettings | None = None

    @model_validator(mode="after")
    def _one_model(self) -> GenerateBody:
        if self.model and self.model_id and self.model != self.model_id:
            raise ValueError("model and model_id name different models; send one of them")
        return self

    def to_request(self) -> GenerateRequest:
        flat = self.model_dump(exclude={"settings", "model_id"}, exclude_none=True)
        flat["model"] = self.model or self.model_id
        if self.settings is not None:
            for name, value in self.settings.model_dump(exclude={"max_sequence_length"}, exclude_none=True).items():
                flat[name] = value
        return GenerateRequest.model_validate(flat)


class JobAccepted(BaseModel):
    job_id: str
    # "pending" for a new job; a replayed idempotent submit answers the job's current status.
    status: JobStatus = JobStatus.PENDING
    model: str
    num_images: int
    created_at: datetime
    status_url: str
    message: str


class Progress(BaseModel):
    step: int
    total_steps: int


class ImageView(BaseModel):
    id: str
    url: str | None = Field(description="Presigned object-store URL; null once the image has expired")
    download_url: str = Field(description="The image through the API (needs the API key)")
    file_url: str = Field(description="Signed link to the image that needs no key, valid until expires_at")
    thumb_url: str = Field(description="Signed link to a small JPEG thumbnail, valid until expires_at")
    expires_at: datetime
    expired: bool
    width: int
    height: int
    seed: int | None
    content_type: str


class JobView(BaseModel):
    id: str
    status: JobStatus
    prompt: str
    negative_prompt: str | None
    model: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int | None
    num_images: int
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    progress: Progress
    images: list[ImageView]
    loras: list[LoraRequest]
    error: str | None


class ErrorResponse(BaseModel):
    status: Literal["error"] = "error"
    message: str


class JobList(BaseModel):
    jobs: list[JobView]
    page: int
    limit: int
    total: int


class ModelInfo(BaseModel):
    """One catalog entry as clients see it (seed 003's ``/models`` fields plus capabilities)."""

    id: str
    description: str
    source: str = Field(description="Hub id or folder the weights come from ('builtin:…' for tiny offline ones)")
    backend: str
    random_weights: bool
    default_width: int
    default_height: int
    max_width: int
    max_height: int
    default_steps: int
    max_steps: int
    default_guidance: float
    max_images: int
    supports_negative_prompt: bool
    supports_lora: bool
    supports_guidance: bool = True


class ModelList(BaseModel):
    models: dict[str, ModelInfo]
    default: str


class CancelResult(BaseModel):
    job_id: str
    status: JobStatus
    message: str


class GalleryImage(BaseModel):
    """One image of the gallery with the job that made it (a superset of CyberImage's gallery item)."""

    id: str
    job_id: str
    model_id: str
    prompt: str
    negative_prompt: str | None
    settings: dict[str, Any]
    created_at: datetime
    expires_at: datetime
    width: int
    height: int
    seed: int | None
    content_type: str
    file_url: str
    thumb_url: str
    download_url: str


class Gallery(BaseModel):
    images: list[GalleryImage]
    page: int
    limit: int
    total: int
    has_more: bool


class ImageMetadata(BaseModel):
    """GET /api/images/{id}/metadata (CyberImage's fields plus what imagebus knows)."""

    id: str
    job_id: str
    model_id: str
    prompt: str
    negative_prompt: str | None
    settings: dict[str, Any]
    loras: list[LoraRequest]
    ignored_parameters: list[str] = Field(description="Request fields accepted but not used by this model")
    seed: int | None
    width: int
    height: int
    content_type: str
    size_bytes: int
    generation_time: float = Field(description="When the image was stored, as Unix seconds")
    image_number: int
    total_images: int
    created_at: datetime
    expires_at: datetime


class StatusCounts(BaseModel):
    pending: int = 0
    processing: int = 0
    completed: int = 0
    failed: int = 0
    canceled: int = 0
    total: int = 0


class QueueStats(StatusCounts):
    """GET /api/queue; the ``detailed`` fields only with ?detailed=true."""

    queue_size: int
    recent_24h: StatusCounts | None = None
    avg_processing_time_seconds: float | None = None
    models: dict[str, StatusCounts] | None = None
    failure_rate: float | None = None


class ResetResult(BaseModel):
    status: Literal["success"] = "success"
    reset_count: int
    message: str


class EnrichRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    style: str = "cyberpunk"


class EnrichResult(BaseModel):
    original_prompt: str
    enriched_prompt: str
    style: str
    source: Literal["template", "llm"]


class LoraInfo(BaseModel):
    id: str
    name: str
    image: str | None
    tags: list[str]
    trigger_words: list[str]
    models: list[str] = Field(description="Model ids it applies to (empty: any model that supports LoRAs)")


class LoraList(BaseModel):
    loras: list[LoraInfo]


class UpstreamQuotaView(BaseModel):
    """An outside service's quota as a backend last read it (e.g. the credits of a website)."""

    source: str
    backend: str
    used: int | None
    limit: int | None
    remaining: int | None
    resets_at: datetime | None
    observed_at: datetime


class Quota(BaseModel):
    """The caller's usage against their limits (``remaining`` = limits - usage, never below 0)."""

    usage: dict[str, int]
    limits: dict[str, int]
    remaining: dict[str, int]
    # Quotas of the outside services the backends use, shared by every caller.
    upstream: list[UpstreamQuotaView] = Field(default_factory=list)


class Deleted(BaseModel):
    status: Literal["success"] = "success"
    message: str = "Image deleted successfully"
