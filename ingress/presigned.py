"""Presigned object-store URLs for image views, each one handed out again for a while.

A status poll shows every image of the job with a presigned GET URL, and signing one (SigV4:
HMAC-SHA256 over a canonical request, then a key derived in four more rounds) was the largest
cost of a status read inside the ingress. A URL signed at ``t`` works until ``t`` plus the
lifetime it was signed for, which never reaches past the image's ``expires_at``
(``ObjectStore.presigned_get_url``), so giving the same URL to the next polls keeps invariant 6:
no URL, old or new, outlives its image.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from storage.object_store import ObjectStore

# How long one signed URL is handed out before a fresh one is signed.
REUSE = timedelta(seconds=60)
# URLs remembered at once; beyond it the cache starts over (each entry is one short string).
MAX_URLS = 10_000


class PresignedUrls:
    def __init__(self, store: ObjectStore, *, reuse: timedelta = REUSE, max_urls: int = MAX_URLS) -> None:
        self._store = store
        self._reuse = reuse
        self._max_urls = max_urls
        # (object key, expires_at) -> (when it was signed, the URL)
        self._urls: dict[tuple[str, datetime], tuple[datetime, str]] = {}

    def get(self, object_key: str, expires_at: datetime, now: datetime) -> str | None:
        """A GET URL for the object that stops working no later than ``expires_at``; None once
        none can (as ``ObjectStore.presigned_get_url``)."""
        if expires_at <= now:
            return None
        key = (object_key, expires_at)
        cached = self._urls.get(key)
        if cached is not None and timedelta(0) <= now - cached[0] < self._reuse:
            return cached[1]
        url = self._store.presigned_get_url(object_key, expires_at, now)
        if url is not None:
            if len(self._urls) >= self._max_urls:
                self._urls.clear()
            self._urls[key] = (now, url)
        return url
