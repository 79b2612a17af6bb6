"""Images as the API serves them: the gallery, metadata, bytes, thumbnails, deletion.

Every route that hands out an image (native, CyberImage's ``get_image``, txt2img's
``{filename}``, signed ``/files`` links) goes through ``ImageService.content`` so the
expiry and ownership checks live in one place.
"""

from __future__ import annotations

import asyncio
import io
import re
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from bus import Bus
from ingress.errors import ApiError
from ingress.jobs import JobService, normalized_id, valid_id
from ingress.links import LinkKind
from projector.queries import GalleryRecord
from projector.readside import ImageRecord, ReadModel
from schemas import GenerationParams, ImageDeleted
from schemas.api import Deleted, Gallery, GalleryImage, ImageMetadata
from storage.object_store import ObjectMissing, ObjectStore

log = structlog.get_logger(__name__)

MAX_PAGE_SIZE = 50
# Far past any real listing; larger pages would overflow the database's offset integer.
MAX_PAGE = 1_000_000
THUMBNAIL_SIZE = 256
# Thumbnails are a few KB; keep the recent ones so a gallery page does not re-decode its images.
_THUMB_CACHE_ENTRIES = 512
# "<id>", "<id>.png", "<id>.jpg": anything else (slashes, dots, "..") is not an image name.
_FILENAME = re.compile(r"^(?P<id>[0-9a-fA-F-]{32,36})(?:\.(?P<ext>png|jpe?g|webp))?$")
FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp"}


def image_id_from_filename(filename: str) -> str:
    """The image id a ``{filename}`` names; 404 for anything that is not ``<id>[.ext]``."""
    match = _FILENAME.match(filename)
    image_id = normalized_id(match["id"]) if match else ""
    if not valid_id(image_id):
        raise ApiError(404, f"image {filename!r} not found")
    return image_id


def check_page(page: int, limit: int) -> None:
    if not 1 <= page <= MAX_PAGE:
        raise ApiError(400, f"page must be between 1 and {MAX_PAGE}")
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ApiError(400, f"limit must be between 1 and {MAX_PAGE_SIZE}")


def settings_of(params: GenerationParams) -> dict[str, object]:
    """The generation settings as CyberImage reports them."""
    return {
        "num_inference_steps": params.num_inference_steps,
        "guidance_scale": params.guidance_scale,
        "height": params.height,
        "width": params.width,
        "num_images": params.num_images,
        "seed": params.seed,
    }


@dataclass(frozen=True)
class ImageContent:
    chunks: AsyncIterator[bytes]
    media_type: str


class ImageService:
    def __init__(self, bus: Bus, read_model: ReadModel, store: ObjectStore, jobs: JobService) -> None:
        self._bus = bus
        self._read_model = read_model
        self._store = store
        self._jobs = jobs
        self._thumbs: OrderedDict[str, bytes] = OrderedDict()

    async def gallery(
        self, owner: str, *, page: int, limit: int, search: str | None = None, model: str | None = None
    ) -> Gallery:
        check_page(page, limit)
        if search is not None and len(search) > 200:
            raise ApiError(400, "search must be at most 200 characters")
        records, total = await self._read_model.gallery(
            owner, datetime.now(UTC), search=search or None, model=model or None, offset=(page - 1) * limit, limit=limit
        )
        return Gallery(
            images=[self.gallery_image(record) for record in records],
            page=page,
            limit=limit,
            total=total,
            has_more=page * limit < total,
        )

    def gallery_image(self, record: GalleryRecord) -> GalleryImage:
        image, params = record.image, record.params
        signer = self._jobs.signer
        return GalleryImage(
            id=image.id,
            job_id=image.job_id,
            model_id=params.model,
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            settings=settings_of(params),
            created_at=image.created_at,
            expires_at=image.expires_at,
            width=image.width,
            height=image.height,
            seed=image.seed,
            content_type=image.content_type,
            file_url=signer.file_url(image.id, image.content_type),
            thumb_url=signer.thumb_url(image.id),
            download_url=f"/api/images/{image.id}",
        )

    async def metadata(self, image_id: str, owner: str) -> ImageMetadata:
        image = await self._jobs.image(image_id, owner)
        job = await self._jobs.job(image.job_id, owner)
        params = job.params
        return ImageMetadata(
            id=image.id,
            job_id=image.job_id,
            model_id=params.model,
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            settings=settings_of(params),
            loras=list(params.loras),
            ignored_parameters=list(params.ignored_parameters),
            seed=image.seed,
            width=image.width,
            height=image.height,
            content_type=image.content_type,
            size_bytes=image.size_bytes,
            generation_time=image.created_at.timestamp(),
            image_number=image.index + 1,
            total_images=params.num_images,
            created_at=image.created_at,
            expires_at=image.expires_at,
        )

    async def delete(self, image_id: str, owner: str) -> Deleted:
        """Gone from storage and from every listing at once; ``ImageDeleted`` tells everyone else."""
        image = await self._jobs.image(image_id, owner)
        await self._store.delete(image.object_key)
        await self._read_model.mark_image_deleted(image.id, owner)
        await self._bus.publish_event(ImageDeleted(job_id=image.job_id, image_id=image.id))
        self._thumbs.pop(image.id, None)
        log.info("image_deleted", job_id=image.job_id, image_id=image.id)
        return Deleted()

    async def owned(self, image_id: str, owner: str) -> ImageRecord:
        return _fetchable(await self._jobs.image(image_id, owner))

    async def signed(self, kind: LinkKind, filename: str, signature: str) -> ImageRecord:
        """The image a signed link names (any owner: the signature is the permission)."""
        image_id = image_id_from_filename(filename)
        if not self._jobs.signer.verify(kind, image_id, signature):
            raise ApiError(403, "invalid link signature")
        image = await self._read_model.get_image(image_id, None)
        if image is None:
            raise ApiError(404, f"image {image_id} not found")
        return _fetchable(image)

    async def content(self, image: ImageRecord, fmt: str | None = None) -> ImageContent:
        """The stored bytes, streamed; or converted to ``fmt`` (png, jpeg, webp) when it differs."""
        try:
            chunks = await _opened(self._store.get_stream(image.object_key))
        except ObjectMissing as exc:
            raise ApiError(410, f"image {image.id} is no longer stored") from exc
        wanted = FORMATS.get(fmt or "", image.content_type)
        if wanted == image.content_type:
            return ImageContent(chunks, image.content_type)
        data = b"".join([chunk async for chunk in chunks])
        converted = await asyncio.to_thread(_convert, data, wanted.removeprefix("image/"))
        return ImageContent(_once(converted), wanted)

    async def thumbnail(self, image: ImageRecord) -> bytes:
        cached = self._thumbs.get(image.id)
        if cached is not None:
            self._thumbs.move_to_end(image.id)
            return cached
        content = await self.content(image)
        data = b"".join([chunk async for chunk in content.chunks])
        thumb = await asyncio.to_thread(_thumbnail, data)
        self._thumbs[image.id] = thumb
        while len(self._thumbs) > _THUMB_CACHE_ENTRIES:
            self._thumbs.popitem(last=False)
        return thumb


def _fetchable(image: ImageRecord) -> ImageRecord:
    if image.state == "expired" or image.expires_at <= datetime.now(UTC):
        raise ApiError(410, f"image {image.id} expired at {image.expires_at.isoformat()}")
    return image


async def _opened(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Read the first chunk now, so a missing object becomes an error before headers are sent."""
    first = await anext(chunks, b"")

    async def replay() -> AsyncIterator[bytes]:
        yield first
        async for chunk in chunks:
            yield chunk

    return replay()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _convert(data: bytes, fmt: str) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, format=fmt.upper())
        return out.getvalue()


def _thumbnail(data: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        small = image.convert("RGB")
        small.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        out = io.BytesIO()
        small.save(out, format="JPEG", quality=80)
        return out.getvalue()
