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


# Links minted and remembered at once: every status poll shows the same ones again.
_MINTED = 10_000


class LinkSigner:
    def __init__(self, secret: str) -> None:
        self._secret = b"imagebus-links:" + secret.encode()
        self._minted: dict[tuple[LinkKind, str], str] = {}

    def signature(self, kind: LinkKind, image_id: str) -> str:
        return hmac.new(self._secret, f"{kind}:{image_id}".encode(), hashlib.sha256).hexdigest()[:32]

    def verify(self, kind: LinkKind, image_id: str, signature: str) -> bool:
        return hmac.compare_digest(self.signature(kind, image_id), signature)

    def file_url(self, image_id: str, content_type: str = "image/png") -> str:
        extension = _EXTENSIONS.get(content_type, "png")
        return f"/files/{image_id}.{extension}?sig={self._remembered('file', image_id)}"

    def thumb_url(self, image_id: str) -> str:
        return f"/files/thumbs/{image_id}.jpg?sig={self._remembered('thumb', image_id)}"

    def _remembered(self, kind: LinkKind, image_id: str) -> str:
        # Only for links we mint (ids of real images), never for ones presented to verify.
        signature = self._minted.get((kind, image_id))
        if signature is None:
            if len(self._minted) >= _MINTED:
                self._minted.clear()
            signature = self._minted[(kind, image_id)] = self.signature(kind, image_id)
        return signature
