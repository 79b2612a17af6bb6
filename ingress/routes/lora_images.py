"""``GET /api/loras/{lora_id}/image``: a scanned LoRA's preview, from the LoRA folder or bucket.

Public (no key): it is catalog art, shown on the web page beside the LoRA's name. The scan
(``imagebus/lora_catalog.py``) names each preview's location; this route is the only reader of them,
so the file system layout and bucket names never reach a client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import structlog
import urllib3
from litestar import Request, get
from litestar.params import FromPath
from litestar.response import Stream
from minio import Minio
from minio.error import S3Error

from ingress.errors import ApiError
from ingress.openapi_responses import error_responses, image_response

log = structlog.get_logger(__name__)

_CHUNK = 64 * 1024
_MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NoSuchBucket"})
# Previews change only when an operator replaces a file and restarts; an hour of caching is harmless.
_PUBLIC_CACHE = {"Cache-Control": "public, max-age=3600"}


@dataclass(frozen=True)
class PreviewContent:
    media_type: str
    chunks: AsyncIterator[bytes]


class LoraPreviews:
    """The previews of scanned LoRAs: per LoRA id a local file path or an ``s3://bucket/key`` object."""

    def __init__(self, locations: Mapping[str, str], s3: Minio | None = None) -> None:
        self._locations = dict(locations)
        self._s3 = s3

    async def open(self, lora_id: str) -> PreviewContent | None:
        """The preview's bytes, or None when the LoRA has none (or its file has gone since the scan)."""
        location = self._locations.get(lora_id)
        if location is None:
            return None
        media_type = _MEDIA_TYPES.get(PurePosixPath(location).suffix.lower(), "application/octet-stream")
        if location.startswith("s3://"):
            return await self._open_object(lora_id, location, media_type)
        try:
            file = await asyncio.to_thread(Path(location).open, "rb")
        except OSError as exc:
            log.warning("lora.preview_missing", lora_id=lora_id, location=location, error=str(exc))
            return None
        return PreviewContent(media_type, _file_chunks(file))

    async def _open_object(self, lora_id: str, location: str, media_type: str) -> PreviewContent | None:
        if self._s3 is None:
            log.warning("lora.preview_unreachable", lora_id=lora_id, reason="no S3 client for the LoRA bucket")
            return None
        bucket, _, key = location.removeprefix("s3://").partition("/")
        try:
            response = await asyncio.to_thread(self._s3.get_object, bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                log.warning("lora.preview_missing", lora_id=lora_id, location=location)
                return None
            raise ApiError(503, f"the LoRA bucket answered {exc.code}; try again later") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise ApiError(503, "the LoRA bucket is unreachable; try again later") from exc
        return PreviewContent(media_type, _object_chunks(response))


async def _file_chunks(file: BinaryIO) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(file.read, _CHUNK):
            yield chunk
    finally:
        file.close()


async def _object_chunks(response: Any) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(response.read, _CHUNK):
            yield chunk
    finally:
        response.close()
        response.release_conn()


def lora_previews_of(request: Request[Any, Any, Any]) -> LoraPreviews:
    """The app's ``LoraPreviews``, set on ``app.state.lora_previews`` when the app is built."""
    previews: LoraPreviews = request.app.state.lora_previews
    return previews


@get(
    "/api/loras/{lora_id:str}/image",
    summary="A LoRA's preview image (no key needed)",
    tags=["native"],
    responses={200: image_response(), **error_responses(404, 503)},
)
async def lora_image(request: Request[Any, Any, Any], lora_id: FromPath[str]) -> Stream:
    content = await lora_previews_of(request).open(lora_id)
    if content is None:
        raise ApiError(404, f"LoRA {lora_id!r} has no preview image")
    return Stream(content.chunks, media_type=content.media_type, headers=_PUBLIC_CACHE)


lora_image_handlers = [lora_image]
