"""The Backend protocol: how the worker runtime asks a backend for images.

Backends are async: the remote and browser backends wait on the network, and the diffusers backend
runs torch on a thread of its own. The runtime decides how many jobs a backend gets at once
(``concurrency``) and whether compatible jobs go in one call (``max_batch_images``). A backend that
makes pixels itself hands them back unencoded (``RenderedImage``): the runtime encodes them in the
worker's image format off the model's thread, while the model makes the next batch.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, BinaryIO, Protocol

from schemas import GenerationParams

if TYPE_CHECKING:
    from PIL.Image import Image


class RetryableError(Exception):
    """A transient failure: the job is handed back and retried after ``delay_s``."""

    def __init__(self, message: str, delay_s: float = 1.0) -> None:
        super().__init__(message)
        self.delay_s = delay_s


class GenerationCanceled(Exception):
    """Raised by a backend when the cancel token was set between steps."""


class CancelToken:
    """Cooperative cancellation, checked by backends between steps (thread-safe)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""
        self._listeners: list[Callable[[], None]] = []

    def cancel(self, reason: str) -> None:
        if self._event.is_set():
            return
        self.reason = reason
        self._event.set()
        for listener in list(self._listeners):
            listener()

    def on_cancel(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (on the canceller's thread) when canceled; at once if already canceled."""
        self._listeners.append(listener)
        if self._event.is_set():
            listener()

    @property
    def canceled(self) -> bool:
        return self._event.is_set()

    def raise_if_canceled(self) -> None:
        if self._event.is_set():
            raise GenerationCanceled(self.reason)


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    # Small JPEG bytes when the backend produced a preview for this step.
    preview_jpeg: bytes | None = None


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class GeneratedImage:
    """One finished image, ready to stream into the object store.

    ``content`` is a readable file positioned at the start: an in-memory buffer for images made
    here, a spooled temporary file for images downloaded from elsewhere (never held whole in memory).
    """

    content: BinaryIO
    length: int
    content_type: str
    width: int
    height: int
    seed: int | None

    @classmethod
    def from_bytes(cls, data: bytes, content_type: str, width: int, height: int, seed: int | None) -> GeneratedImage:
        return cls(io.BytesIO(data), len(data), content_type, width, height, seed)

    def read_all(self) -> bytes:
        """The whole content (tests and small images only); leaves the file at its start."""
        self.content.seek(0)
        data = self.content.read()
        self.content.seek(0)
        return data


@dataclass(frozen=True)
class RenderedImage:
    """One finished image as pixels, not yet encoded (the runtime encodes it off the model's thread)."""

    pixels: Image
    seed: int | None

    @property
    def width(self) -> int:
        return self.pixels.width

    @property
    def height(self) -> int:
        return self.pixels.height


# What a backend hands back per image: encoded bytes (downloaded, captured), or pixels to encode.
BackendImage = GeneratedImage | RenderedImage


@dataclass
class JobRequest:
    """One job as a backend sees it: what to make, where to report, when to stop."""

    job_id: str
    params: GenerationParams
    on_progress: ProgressCallback
    cancel: CancelToken = field(default_factory=CancelToken)


@dataclass(frozen=True)
class SiteQuota:
    """A quota read from the outside service a backend uses (a website's credits, an API's limit)."""

    source: str
    used: int | None
    limit: int | None
    remaining: int | None
    resets_at: datetime | None = None


class Backend(Protocol):
    """A way of making images."""

    name: str
    # Jobs the runtime may hand this backend at once (remote APIs: the endpoint's cap; torch: 1).
    concurrency: int
    # Images one ``generate_batch`` call may make; 1 means the backend does not batch.
    max_batch_images: int

    async def prepare(self, model: str) -> None:
        """Load what ``model`` needs (once; later calls for a loaded model are cheap)."""

    async def generate(self, job: JobRequest) -> Sequence[BackendImage]:
        """Make ``job.params.num_images`` images, reporting progress, stopping when canceled."""
        ...

    def batch_key(self, params: GenerationParams) -> Hashable | None:
        """Jobs with equal keys may share one ``generate_batch`` call; None: never batched."""
        ...

    async def generate_batch(self, jobs: list[JobRequest]) -> Sequence[Sequence[BackendImage] | BaseException]:
        """Several compatible jobs in one call; one result (images or the job's error) per job.

        A canceled member gets ``GenerationCanceled`` and the others their images; the call as a
        whole stops early only when every member is canceled.
        """
        ...

    async def site_quota(self) -> SiteQuota | None:
        """The outside service's quota as last seen, where the backend has one (else None)."""
        ...

    async def close(self) -> None:
        """Release what the backend holds (threads, browsers, HTTP pools)."""
