"""A real backend slowed down per step: long enough to watch, to cancel, to see previews."""

from __future__ import annotations

import time

from schemas import GenerationParams
from workers.backends.base import Backend, CancelToken, GeneratedImage, Progress, ProgressCallback


class StepDelayBackend:
    """A backend slowed down after every step, so a job runs long enough to watch and to cancel."""

    def __init__(self, inner: Backend, step_delay_s: float) -> None:
        self.name = inner.name
        self._inner = inner
        self._step_delay_s = step_delay_s

    def prepare(self, model: str) -> None:
        self._inner.prepare(model)

    def generate(
        self, params: GenerationParams, on_progress: ProgressCallback, cancel: CancelToken
    ) -> list[GeneratedImage]:
        def slowed(progress: Progress) -> None:
            time.sleep(self._step_delay_s)  # in the worker's backend thread, like a real slow step
            on_progress(progress)

        return self._inner.generate(params, slowed, cancel)
