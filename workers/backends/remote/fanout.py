"""Several image fetches of one job at once: progress as each arrives, nothing left open on failure."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

from workers.backends.base import GeneratedImage, JobRequest, Progress, RetryableError
from workers.backends.remote.answers import RemoteApiError

ImageFetch = Callable[[], Awaitable[GeneratedImage]]


class ProgressCount:
    """Reports Progress(step=images so far, total_steps=images wanted) as images arrive."""

    def __init__(self, job: JobRequest, total: int) -> None:
        self._job = job
        self._total = total
        self._done = 0

    def image_ready(self) -> None:
        self._done += 1
        self._job.on_progress(Progress(step=self._done, total_steps=self._total))


async def fetch_all(fetches: list[ImageFetch], progress: ProgressCount) -> list[GeneratedImage]:
    """Run every fetch concurrently; the images in the fetches' order.

    The first failure stops the others (the job fails or is retried as a whole), and every image that
    already arrived is closed, so no spooled file outlives a failed job.
    """
    images: list[GeneratedImage | None] = [None] * len(fetches)

    async def fetch(index: int) -> None:
        images[index] = await fetches[index]()
        progress.image_ready()

    try:
        async with asyncio.TaskGroup() as group:
            for index in range(len(fetches)):
                group.create_task(fetch(index))
    except BaseException as exc:
        close_images(image for image in images if image is not None)
        if isinstance(exc, BaseExceptionGroup):
            raise most_telling(exc) from None
        raise
    return [image for image in images if image is not None]


def most_telling(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that decides the job: a permanent one over a retryable one over anything else."""
    leaves = _leaves(group)
    for kind in (RemoteApiError, RetryableError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return leaves[0]


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def close_images(images: Iterable[GeneratedImage]) -> None:
    for image in images:
        image.content.close()
