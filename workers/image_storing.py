"""A finished job's images into the object store: encoded if they are pixels, uploaded, announced.

Runs in the worker's finishing step, beside the next backend call: encoding on threads of the
worker's own (Pillow compresses without the GIL), uploads on the object store's, the images of one
job at once. Each image's bytes exist once, in the buffer the upload reads from.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from datetime import UTC, datetime, timedelta

from schemas import Event, ImageStored, image_id_for
from storage.object_store import ObjectStore
from workers.backends.base import BackendImage, CancelToken, GeneratedImage, RenderedImage
from workers.encoding import ImageFormat


class ImageStorer:
    def __init__(
        self,
        store: ObjectStore,
        publish: Callable[[Event], Awaitable[None]],
        image_format: ImageFormat,
        image_ttl_s: float,
    ) -> None:
        self._store = store
        self._publish = publish
        self._format = image_format
        self._ttl = timedelta(seconds=image_ttl_s)

    async def store_all(
        self, job_id: str, images: Sequence[BackendImage], token: CancelToken, encoder: Executor | None
    ) -> list[str]:
        """Every image of the job stored and announced (concurrently); its image ids, in order.
        Raises the first failure (the others are stopped), GenerationCanceled once canceled."""
        if len(images) == 1:
            return [await self._store_one(job_id, 0, images[0], token, encoder)]
        try:
            async with asyncio.TaskGroup() as group:
                stores = [
                    group.create_task(self._store_one(job_id, index, image, token, encoder))
                    for index, image in enumerate(images)
                ]
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        return [store.result() for store in stores]

    async def _store_one(
        self, job_id: str, index: int, image: BackendImage, token: CancelToken, encoder: Executor | None
    ) -> str:
        token.raise_if_canceled()
        if isinstance(image, RenderedImage):
            image = await asyncio.get_running_loop().run_in_executor(encoder, self._encode, image)
            if token.canceled:  # meanwhile: nothing of it goes up
                image.content.close()
                token.raise_if_canceled()
        # The same id on every run of the job: a redelivered job rewrites its images.
        image_id = image_id_for(job_id, index)
        expires_at = datetime.now(UTC) + self._ttl
        key = ObjectStore.image_key(job_id, image_id, expires_at, image.content_type)
        try:
            image.content.seek(0)
            stored = await self._store.put_stream(
                key, image.content, content_type=image.content_type, length=image.length
            )
        finally:
            image.content.close()
        # Canceled meanwhile: settled already (or handed back on shutdown), nothing more goes out.
        token.raise_if_canceled()
        await self._publish(
            ImageStored(
                job_id=job_id,
                image_id=image_id,
                index=index,
                object_key=stored.key,
                content_type=image.content_type,
                width=image.width,
                height=image.height,
                size_bytes=stored.size_bytes,
                seed=image.seed,
                expires_at=expires_at,
            )
        )
        return image_id

    def _encode(self, image: RenderedImage) -> GeneratedImage:
        """On an encoding thread: the bytes in the worker's format; the pixels are freed at once."""
        try:
            return self._format.encode(image)
        finally:
            image.pixels.close()
