"""Shapes of the native REST API (requests and responses)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

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


class JobAccepted(BaseModel):
    job_id: str
    status: Literal["pending"] = "pending"
    model: str
    created_at: datetime
    status_url: str


class Progress(BaseModel):
    step: int
    total_steps: int


class ImageView(BaseModel):
    id: str
    url: str | None = Field(description="Presigned object-store URL; null once the image has expired")
    download_url: str = Field(description="The image through the API (needs the API key)")
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


class ModelList(BaseModel):
    models: dict[str, ModelInfo]
    default: str
