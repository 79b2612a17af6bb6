"""Commands, controls and events that travel on the bus.

Every message is a frozen pydantic model with ``type``, ``schema_version``,
``message_id``, ``job_id`` and ``occurred_at``; JSON on the wire. Older versions
are upcast on read by the functions in ``UPCASTERS``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

SCHEMA_VERSION = 1

_IMAGE_NAMESPACE = uuid.UUID("6f1c1f4e-3b1a-4d8e-9a51-2f6f0e7c9b11")
_TERMINAL_NAMESPACE = uuid.UUID("0b8c4b52-6a2e-4c55-9a77-3f5d0f3a1e42")


def new_id() -> str:
    return uuid.uuid4().hex


def image_id_for(job_id: str, index: int) -> str:
    """Deterministic image id: a redelivered job rewrites the same images, never adds duplicates."""
    return uuid.uuid5(_IMAGE_NAMESPACE, f"{job_id}/{index}").hex


def terminal_message_id(job_id: str) -> str:
    """The one message id of a job's terminal event, whoever emits it and however often.

    A worker killed between publishing its result and acking the command runs the job again and
    publishes a second result; with the same id the log's de-duplication window drops it, so a
    bus subscriber sees one terminal event per job (the read model keeps the first one anyway).
    """
    return uuid.uuid5(_TERMINAL_NAMESPACE, job_id).hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str
    schema_version: int = SCHEMA_VERSION
    message_id: str = Field(default_factory=new_id)
    job_id: str
    occurred_at: datetime = Field(default_factory=utcnow)

    # Live-only events ride the bus's non-durable channel: watchers see them as they happen, the
    # event log never holds them, so neither a replay nor a rebuild sees them. Per-step progress
    # is live data, not history (a 50-step job would be 50 stored events, previews included).
    live_only: ClassVar[bool] = False


class LoraRequest(BaseModel):
    """One LoRA applied to a job: its catalog id, the adapter weight, and the trigger words' weight."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    weight: float = 1.0
    trigger_weight: float = 1.0


class GenerationParams(BaseModel):
    """What to generate; shared by the command and the JobQueued event."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str
    negative_prompt: str | None = None
    model: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int | None = None
    num_images: int = 1
    # Applied in order; a worker that cannot apply one fails the job, it never drops it.
    loras: tuple[LoraRequest, ...] = ()
    # Request fields accepted but not used, where a seed API documents that (CyberImage's
    # negative prompt on Flux models); the job's metadata reports them.
    ignored_parameters: tuple[str, ...] = ()


# --- command and control -------------------------------------------------------------------


class GenerateImage(Message):
    """Work-queue command: exactly one worker of ``backend`` (of ``pool``, when set) takes it."""

    type: Literal["GenerateImage"] = "GenerateImage"
    owner: str
    backend: str
    params: GenerationParams
    # The catalog pool of the model, when it has one (workers pinned to some models).
    pool: str | None = None

    @property
    def queue(self) -> str:
        """The work queue it goes to: the pool's, else the backend's."""
        return self.pool or self.backend


class CancelJob(Message):
    """Broadcast to the backend's workers; whoever runs the job interrupts it."""

    type: Literal["CancelJob"] = "CancelJob"
    backend: str
    reason: str = "canceled by request"


# --- events --------------------------------------------------------------------------------


class JobQueued(Message):
    type: Literal["JobQueued"] = "JobQueued"
    owner: str
    backend: str
    params: GenerationParams
    dialect: str = "native"


class JobStarted(Message):
    type: Literal["JobStarted"] = "JobStarted"
    worker_id: str
    attempt: int


class JobHeartbeat(Message):
    """The worker running the job is alive (sent every minute or so while it runs).

    Steps can be slow (a model loading, a remote API thinking), so progress alone cannot tell a
    slow job from a dead worker; the stall watchdog fails a processing job only when these stop.
    """

    type: Literal["JobHeartbeat"] = "JobHeartbeat"
    worker_id: str
    attempt: int


class JobRequeued(Message):
    """A stalled job put back to pending (``POST /api/reset_queue``) and its command re-published."""

    type: Literal["JobRequeued"] = "JobRequeued"
    reason: str


class JobProgress(Message):
    """A step of a running job, with now and then a preview. Live only: never in the event log."""

    live_only: ClassVar[bool] = True

    type: Literal["JobProgress"] = "JobProgress"
    step: int
    total_steps: int
    # Which delivery of the job this progress belongs to (a redelivered job starts over).
    attempt: int = 1
    # Small JPEG as a data URL, at most every 0.5 s; absent on most steps.
    preview: str | None = None


class ImageStored(Message):
    type: Literal["ImageStored"] = "ImageStored"
    image_id: str
    index: int
    object_key: str
    content_type: str
    width: int
    height: int
    size_bytes: int
    seed: int | None = None
    expires_at: datetime


class JobSucceeded(Message):
    type: Literal["JobSucceeded"] = "JobSucceeded"
    image_ids: list[str]


class JobFailed(Message):
    type: Literal["JobFailed"] = "JobFailed"
    error: str


class JobCanceled(Message):
    type: Literal["JobCanceled"] = "JobCanceled"
    reason: str


class ImageExpired(Message):
    type: Literal["ImageExpired"] = "ImageExpired"
    image_id: str
    object_key: str


class ImageDeleted(Message):
    type: Literal["ImageDeleted"] = "ImageDeleted"
    image_id: str


class UpstreamQuotaObserved(Message):
    """A backend read the quota of the outside service it uses (a website's credits), after the
    job ``job_id``. The read model keeps the latest per ``source``; ``/quota`` shows it."""

    type: Literal["UpstreamQuotaObserved"] = "UpstreamQuotaObserved"
    backend: str
    source: str
    used: int | None = None
    limit: int | None = None
    remaining: int | None = None
    resets_at: datetime | None = None


Event = Annotated[
    JobQueued
    | JobStarted
    | JobHeartbeat
    | JobRequeued
    | JobProgress
    | ImageStored
    | JobSucceeded
    | JobFailed
    | JobCanceled
    | ImageExpired
    | ImageDeleted
    | UpstreamQuotaObserved,
    Field(discriminator="type"),
]

EVENT_TYPES: tuple[str, ...] = (
    "JobQueued",
    "JobStarted",
    "JobHeartbeat",
    "JobRequeued",
    "JobProgress",
    "ImageStored",
    "JobSucceeded",
    "JobFailed",
    "JobCanceled",
    "ImageExpired",
    "ImageDeleted",
    "UpstreamQuotaObserved",
)

_event_adapter: TypeAdapter[Event] = TypeAdapter(Event)

# (type, from_version) -> function turning that version's dict into the next version's dict.
UPCASTERS: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {}


def _upcast(raw: dict[str, Any]) -> dict[str, Any]:
    version = int(raw.get("schema_version", 1))
    while version < SCHEMA_VERSION:
        step = UPCASTERS[(raw["type"], version)]
        raw = step(raw)
        version += 1
        raw["schema_version"] = version
    return raw


def _load(data: bytes | str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(data, dict):
        return _upcast(dict(data))
    import json

    return _upcast(json.loads(data))


def encode(message: Message) -> bytes:
    return message.model_dump_json().encode()


def decode_event(data: bytes | str | dict[str, Any]) -> Event:
    return _event_adapter.validate_python(_load(data))


def decode_command(data: bytes | str | dict[str, Any]) -> GenerateImage:
    return GenerateImage.model_validate(_load(data))


def decode_control(data: bytes | str | dict[str, Any]) -> CancelJob:
    return CancelJob.model_validate(_load(data))
