"""The web page at ``/``: one HTML file, plain JavaScript and CSS, no build step.

The page talks only to the native API under ``/api``; these routes just hand out its files,
read from the package (next to this module), not from the working directory.
"""

from __future__ import annotations

from pathlib import Path

from litestar import Router, get
from litestar.datastructures import CacheControlHeader
from litestar.response import File
from litestar.static_files import create_static_files_router

from ingress.hardening import ShortNames

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

# Same-origin scripts and API calls only. Images may also be presigned object-store URLs
# (another origin) and previews are data: URLs.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data: blob: http: https:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
# Revalidate on every load (ETag), so a new release is picked up without a hard refresh.
_REVALIDATE = CacheControlHeader(no_cache=True)


@get("/", include_in_schema=False, sync_to_thread=False, cache_control=_REVALIDATE)
def index() -> File:
    return File(
        WEB_DIR / "index.html",
        content_disposition_type="inline",
        media_type="text/html",
        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff"},
    )


web_router = Router(
    path="/",
    route_handlers=[
        index,
        create_static_files_router(
            path="/static", directories=[WEB_DIR], cache_control=_REVALIDATE, name="web", middleware=[ShortNames()]
        ),
    ],
    include_in_schema=False,
)
