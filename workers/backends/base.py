"""The Backend protocol: prepare once, generate many, report progress through a callback."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from schemas import GenerationParams


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

    def cancel(self, reason: str) -> None:
        self.reason = reason
        self._event.set()

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
    """One finished image, encoded (PNG by default) and ready to stream into the object store."""

    data: bytes
    content_type: str
    width: int
    height: int
    seed: int | None


class Backend(Protocol):
    """A way of making images. Calls are blocking; the worker runs them in a thread."""

    name: str

    def prepare(self, model: str) -> None:
        """Load what ``model`` needs (once; later calls for a loaded model are cheap)."""

    def generate(
        self, params: GenerationParams, on_progress: ProgressCallback, cancel: CancelToken
    ) -> list[GeneratedImage]:
        """Make ``params.num_images`` images, calling ``on_progress`` every step."""
        ...
