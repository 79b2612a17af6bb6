"""Signed links to images that work without an API key (``<img src>``, seed clients' ``imageUrl``).

A link is a capability: ``/files/<image_id>.<ext>?sig=<hmac>``. Only the server secret can mint
one, it names exactly one image, and it dies with the image (the route checks ``expires_at``),
so it never outlives the 10-minute expiry the way a forwarded key would.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Literal

LinkKind = Literal["file", "thumb"]

_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


class LinkSigner:
    def __init__(self, secret: str) -> None:
        self._secret = b"imagebus-links:" + secret.encode()

    def signature(self, kind: LinkKind, image_id: str) -> str:
        return hmac.new(self._secret, f"{kind}:{image_id}".encode(), hashlib.sha256).hexdigest()[:32]

    def verify(self, kind: LinkKind, image_id: str, signature: str) -> bool:
        return hmac.compare_digest(self.signature(kind, image_id), signature)

    def file_url(self, image_id: str, content_type: str = "image/png") -> str:
        extension = _EXTENSIONS.get(content_type, "png")
        return f"/files/{image_id}.{extension}?sig={self.signature('file', image_id)}"

    def thumb_url(self, image_id: str) -> str:
        return f"/files/thumbs/{image_id}.jpg?sig={self.signature('thumb', image_id)}"
