"""What routes declare in the OpenAPI document where Litestar cannot tell from their signatures.

Left to itself Litestar documents a 400 in the shape of its own ValidationException, which the
ingress never sends (``ingress/errors.py`` turns every error into ``ErrorResponse``), and no
other error at all; a streamed image or event stream it documents as JSON. Each handler names
its answers here, so clients and schemathesis read what the ingress really does.
"""

from __future__ import annotations

from typing import TypedDict

from litestar.openapi import ResponseSpec

from schemas import ErrorResponse

_DESCRIPTIONS = {
    400: "Invalid request: a parameter or the body failed validation",
    401: "Missing or invalid API key (X-API-Key or Authorization: Bearer)",
    403: "The key may not do this",
    404: "No such job or image for this key",
    408: "The request body did not arrive in time",
    409: "The job id or Idempotency-Key is in use with a different request",
    410: "The image expired or is no longer stored",
    413: "The request body is larger than the ingress accepts",
    429: "Over a rate limit, a quota or the queue bound; retry after Retry-After seconds",
    503: "A service behind the ingress is unavailable, or too many streams are open; retry later",
}

# What any route can answer before its handler runs: a bad parameter, a body too large or too
# slow (ingress/hardening.py), a rate limit.
_ANY_ROUTE = (400, 408, 413, 429)


def error_responses(*codes: int) -> dict[int, ResponseSpec]:
    """``responses=`` for a route that can also answer ``codes``, each as ``ErrorResponse``."""
    return {
        code: ResponseSpec(data_container=ErrorResponse, description=_DESCRIPTIONS[code], generate_examples=False)
        for code in sorted({*_ANY_ROUTE, *codes})
    }


def image_response(media_type: str = "image/*") -> ResponseSpec:
    """The 200 of a route that answers image bytes (PNG, JPEG or WebP; ``image/*`` when it varies)."""
    return ResponseSpec(data_container=bytes, media_type=media_type, description="The image", generate_examples=False)


class StreamEvent(TypedDict, total=False):
    """One event of a stream, as a client's parser sees it; ``data`` is a JSON document."""

    data: str
    id: str
    event: str


def event_stream_response() -> ResponseSpec:
    """The 200 of a Server-Sent Events route (the schema is each event's)."""
    return ResponseSpec(
        data_container=StreamEvent,
        media_type="text/event-stream",
        description="Server-Sent Events",
        generate_examples=False,
    )
