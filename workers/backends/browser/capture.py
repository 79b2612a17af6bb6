"""Getting image bytes out of a page: from a data: URL, a blob: URL or a URL the page's session may read."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from playwright.async_api import Page

PREVIEW_MAX_SIDE = 128
PREVIEW_JPEG_QUALITY = 60

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)

# A blob: URL lives only inside the page, so the page itself reads it (as base64 across the bridge).
_READ_BLOB_JS = """async (url) => {
  const blob = await (await fetch(url)).blob();
  const bytes = new Uint8Array(await blob.arrayBuffer());
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}"""


class ImageCaptureError(Exception):
    """The page showed something that is not an image we can store."""


@dataclass(frozen=True)
class CapturedImage:
    data: bytes
    content_type: str
    width: int
    height: int


def sniff_content_type(data: bytes) -> str | None:
    for magic, content_type in _SIGNATURES:
        if data.startswith(magic):
            return content_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def decode_data_url(url: str) -> bytes:
    header, _, payload = url.partition(",")
    if not header.startswith("data:") or not _:
        raise ImageCaptureError(f"not a data: URL: {url[:40]!r}")
    if header.endswith(";base64"):
        return base64.b64decode(payload)
    return unquote_to_bytes(payload)


async def read_image_bytes(page: Page, url: str, *, max_bytes: int) -> bytes:
    """The bytes behind an <img> src, read with the page's own cookies."""
    if url.startswith("data:"):
        data = decode_data_url(url)
    elif url.startswith("blob:"):
        data = base64.b64decode(await page.evaluate(_READ_BLOB_JS, url))
    else:
        response = await page.context.request.get(url, headers={"Referer": page.url})
        if not response.ok:
            raise ImageCaptureError(f"the image at {url} answered {response.status} {response.status_text}")
        data = await response.body()
    if len(data) > max_bytes:
        raise ImageCaptureError(f"the image at {url[:80]} is {len(data)} bytes, over the {max_bytes}-byte limit")
    return data


def describe_image(data: bytes, source: str) -> CapturedImage:
    """The image as the site gave it (never re-encoded), with its real size."""
    from PIL import Image, UnidentifiedImageError

    content_type = sniff_content_type(data)
    if content_type is None:
        raise ImageCaptureError(f"{source} is not a PNG, JPEG, WebP or GIF image ({len(data)} bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError) as error:
        raise ImageCaptureError(f"{source} is a broken {content_type} image: {error}") from error
    return CapturedImage(data, content_type, width, height)


def preview_jpeg(data: bytes, *, max_side: int = PREVIEW_MAX_SIDE, quality: int = PREVIEW_JPEG_QUALITY) -> bytes | None:
    """A small JPEG of a preview frame; None when the frame cannot be read (previews are optional)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.thumbnail((max_side, max_side))
            out = io.BytesIO()
            image.convert("RGB").save(out, format="JPEG", quality=quality)
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    return out.getvalue()
