"""One downloaded image: written piece by piece to a spooled temporary file, capped, then identified.

The file stays in memory up to ``max_memory`` bytes and moves to disk past that, so a large image is
never held whole in memory. Passing ``max_bytes`` aborts at once; what arrived is then thrown away.
The image's type and size come from its header (Pillow reads the header, it decodes no pixels).
"""

from __future__ import annotations

import tempfile
from typing import BinaryIO, cast

from PIL import Image, UnidentifiedImageError

from workers.backends.base import GeneratedImage
from workers.backends.remote.answers import RemoteApiError

# What the object store and the API serve as images; anything else Pillow can read is refused.
IMAGE_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
_PEEK_BYTES = 80


class ImageTooLarge(RemoteApiError):
    pass


class NotAnImage(RemoteApiError):
    pass


class ImageSpool:
    def __init__(self, *, max_bytes: int, max_memory: int, source: str) -> None:
        self.file = cast(BinaryIO, tempfile.SpooledTemporaryFile(max_size=max_memory))  # noqa: SIM115 (returned open)
        self.length = 0
        self._max_bytes = max_bytes
        self._source = source

    def check_declared_length(self, content_length: str | None) -> None:
        """Refuse before reading a byte when the server announces more than the cap."""
        if content_length and content_length.isdigit() and int(content_length) > self._max_bytes:
            raise self._too_large(f"announced {int(content_length)} bytes")

    def write(self, chunk: bytes) -> None:
        self.length += len(chunk)
        if self.length > self._max_bytes:
            raise self._too_large(f"more than {self._max_bytes} bytes arrived")
        self.file.write(chunk)

    def finish(self, seed: int | None, content_type_sent: str | None = None) -> GeneratedImage:
        """The image, with its file at the start; ``NotAnImage`` when the bytes are no image we serve."""
        self.file.seek(0)
        try:
            with Image.open(self.file) as image:
                kind, (width, height) = image.format, image.size
                image.verify()  # PNG: checks every chunk's CRC, so a truncated file is caught here
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
            # Pillow's "cannot identify image file" adds nothing; a truncated or broken image's reason does.
            detail = "" if isinstance(exc, UnidentifiedImageError) else f" ({exc})"
            raise self._not_an_image(content_type_sent, detail) from exc
        content_type = IMAGE_TYPES.get(kind or "")
        if content_type is None:
            raise NotAnImage(f"{self._source} sent a {kind} image, which is not served (PNG, JPEG, WebP, GIF are)")
        self.file.seek(0)
        return GeneratedImage(self.file, self.length, content_type, width, height, seed)

    def discard(self) -> None:
        self.file.close()

    def _too_large(self, detail: str) -> ImageTooLarge:
        return ImageTooLarge(
            f"{self._source} sent an image over the endpoint's max_image_bytes ({self._max_bytes} bytes): "
            f"{detail}; download aborted"
        )

    def _not_an_image(self, content_type_sent: str | None, detail: str) -> NotAnImage:
        self.file.seek(0)
        start = self.file.read(_PEEK_BYTES)
        sent = f" ({content_type_sent})" if content_type_sent else ""
        if not start:
            return NotAnImage(f"{self._source} answered with an empty body{sent}, not an image")
        return NotAnImage(f"{self._source} answered with something that is not an image{sent}: {start!r}{detail}")
