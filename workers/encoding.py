"""Encoding the pixels a local model made into the worker's image format (PNG, WebP or JPEG).

Runs on the runtime's encoding threads, never the model's: Pillow releases the GIL while it
compresses, so one batch encodes while the next one diffuses. PNG at zlib level 1 is the lossless
default (a 1024x1024 image: about half the time of Pillow's default level 6, files a little larger);
WebP and JPEG trade exactness for size and speed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Literal

from workers.backends.base import GeneratedImage, RenderedImage

ImageFormatName = Literal["png", "webp", "jpeg"]

_CONTENT_TYPES: dict[ImageFormatName, str] = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}


@dataclass(frozen=True)
class ImageFormat:
    name: ImageFormatName = "png"
    # WebP and JPEG quality (1-100); PNG ignores it.
    quality: int = 90
    # zlib level for PNG: 1 is fast, Pillow's own default (6) costs about twice the time.
    png_compress_level: int = 1

    @property
    def content_type(self) -> str:
        return _CONTENT_TYPES[self.name]

    def encode(self, image: RenderedImage) -> GeneratedImage:
        """The image's bytes in this format, in one buffer that the upload reads from (no copy)."""
        pixels = image.pixels
        options: dict[str, Any]
        match self.name:
            case "png":
                options = {"format": "PNG", "compress_level": self.png_compress_level}
            case "webp":
                options = {"format": "WEBP", "quality": self.quality}
            case "jpeg":
                # JPEG has no alpha channel; pipelines answer RGB, anything else is converted.
                if pixels.mode not in ("RGB", "L"):
                    pixels = pixels.convert("RGB")
                options = {"format": "JPEG", "quality": self.quality}
        buffer = io.BytesIO()
        pixels.save(buffer, **options)
        length = buffer.tell()
        buffer.seek(0)
        return GeneratedImage(buffer, length, self.content_type, image.width, image.height, image.seed)
