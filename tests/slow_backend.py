"""Wrappers over a real backend for tests: shared by a session, or slowed down per step."""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import replace

from schemas import GenerationParams
from workers.backends.base import Backend, BackendImage, JobRequest, Progress, SiteQuota


class SharedBackend:
    """A backend shared by many workers of a test session: everything is the inner backend's
    except ``close``, which would otherwise stop the shared thread at the first worker's end."""

    def __init__(self, inner: Backend) -> None:
        self.name = inner.name
        self.concurrency = inner.concurrency
        self.max_batch_images = inner.max_batch_images
        self.inner = inner

    async def prepare(self, model: str) -> None:
        await self.inner.prepare(model)

    async def generate(self, job: JobRequest) -> Sequence[BackendImage]:
        return await self.inner.generate(job)

    def batch_key(self, params: GenerationParams) -> Hashable | None:
        return self.inner.batch_key(params)

    async def generate_batch(self, jobs: list[JobRequest]) -> Sequence[Sequence[BackendImage] | BaseException]:
        return await self.inner.generate_batch(jobs)

    async def site_quota(self) -> SiteQuota | None:
        return await self.inner.site_quota()

    async def close(self) -> None:
        """Left open: the session owns it."""


class StepDelayBackend:
    """A backend slowed down after every step, so a job runs long enough to watch and to cancel."""

    def __init__(self, inner: Backend, step_delay_s: float) -> None:
        self.name = inner.name
        self.concurrency = inner.concurrency
        self.max_batch_images = 1
        self._inner = inner
        self._step_delay_s = step_delay_s

    async def prepare(self, model: str) -> None:
        await self._inner.prepare(model)

    async def generate(self, job: JobRequest) -> Sequence[BackendImage]:
        def slowed(progress: Progress) -> None:
            time.sleep(self._step_delay_s)  # in the backend's thread, like a real slow step
            job.on_progress(progress)

        return await self._inner.generate(replace(job, on_progress=slowed))

    def batch_key(self, params: GenerationParams) -> Hashable | None:
        return None

    async def generate_batch(self, jobs: list[JobRequest]) -> Sequence[Sequence[BackendImage] | BaseException]:
        raise NotImplementedError

    async def site_quota(self) -> SiteQuota | None:
        return None

    async def close(self) -> None:
        """The inner backend is shared by the session; it stays open."""
