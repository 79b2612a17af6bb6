"""Image routes: the native gallery, bytes, thumbnails, metadata, deletion, and signed ``/files`` links."""

from __future__ import annotations

from typing import Any, Literal

from litestar import Request, delete, get
from litestar.params import FromPath, FromQuery
from litestar.response import Response, Stream

from ingress.auth import require_owner
from ingress.images import ImageContent, image_id_from_filename
from ingress.openapi_responses import error_responses, image_response
from ingress.services import Services
from schemas.api import Deleted, Gallery, ImageMetadata

_PRIVATE_CACHE = {"Cache-Control": "private, max-age=60"}


def _services(request: Request[Any, Any, Any]) -> Services:
    services: Services = request.app.state.services
    return services


def stream_of(content: ImageContent) -> Stream:
    return Stream(content.chunks, media_type=content.media_type, headers=_PRIVATE_CACHE)


def jpeg(data: bytes) -> Response[bytes]:
    return Response(data, media_type="image/jpeg", headers=_PRIVATE_CACHE)


# The second path of a handler is CyberImage's (seed 003) name for the same thing.


@get(
    ["/images", "/gallery"],
    summary="The caller's gallery: newest first, search over prompt and model",
    responses=error_responses(401),
)
async def gallery(
    request: Request[Any, Any, Any],
    page: FromQuery[int] = 1,
    limit: FromQuery[int] = 20,
    search: FromQuery[str | None] = None,
    model: FromQuery[str | None] = None,
) -> Gallery:
    services = _services(request)
    owner = (await require_owner(services.keyring, request)).owner
    return await services.images.gallery(owner, page=page, limit=limit, search=search, model=model)


@get(
    "/images/{filename:str}",
    summary="The image bytes; {filename} is an id or <id>.png (?format=jpeg|webp)",
    responses={200: image_response(), **error_responses(401, 404, 410)},
)
async def image_bytes(
    request: Request[Any, Any, Any],
    filename: FromPath[str],
    format: FromQuery[Literal["png", "jpeg", "webp"] | None] = None,
) -> Stream:
    services = _services(request)
    owner = (await require_owner(services.keyring, request)).owner
    image = await services.images.owned(image_id_from_filename(filename), owner)
    return stream_of(await services.images.content(image, format))


@get(
    "/thumbs/{filename:str}",
    summary="A small JPEG thumbnail of the image",
    responses={200: image_response("image/jpeg"), **error_responses(401, 404, 410)},
)
async def thumbnail(request: Request[Any, Any, Any], filename: FromPath[str]) -> Response[bytes]:
    services = _services(request)
    owner = (await require_owner(services.keyring, request)).owner
    image = await services.images.owned(image_id_from_filename(filename), owner)
    return jpeg(await services.images.thumbnail(image))


@get(
    ["/images/{filename:str}/metadata", "/image/{filename:str}/metadata"],
    summary="How the image was made",
    responses=error_responses(401, 404),
)
async def metadata(request: Request[Any, Any, Any], filename: FromPath[str]) -> ImageMetadata:
    services = _services(request)
    owner = (await require_owner(services.keyring, request)).owner
    return await services.images.metadata(image_id_from_filename(filename), owner)


@delete(
    ["/images/{filename:str}", "/image/{filename:str}"],
    status_code=200,
    summary="Delete the image from storage and gallery now",
    responses=error_responses(401, 404, 503),
)
async def delete_image(request: Request[Any, Any, Any], filename: FromPath[str]) -> Deleted:
    services = _services(request)
    owner = (await require_owner(services.keyring, request)).owner
    return await services.images.delete(image_id_from_filename(filename), owner)


native_image_handlers = [gallery, image_bytes, thumbnail, metadata, delete_image]


@get("/files/{filename:str}", summary="An image by signed link (no key needed)", include_in_schema=False)
async def signed_file(request: Request[Any, Any, Any], filename: FromPath[str], sig: FromQuery[str] = "") -> Stream:
    services = _services(request)
    image = await services.images.signed("file", filename, sig)
    return stream_of(await services.images.content(image))


@get("/files/thumbs/{filename:str}", summary="A thumbnail by signed link", include_in_schema=False)
async def signed_thumb(
    request: Request[Any, Any, Any], filename: FromPath[str], sig: FromQuery[str] = ""
) -> Response[bytes]:
    services = _services(request)
    image = await services.images.signed("thumb", filename, sig)
    return jpeg(await services.images.thumbnail(image))


signed_file_handlers = [signed_file, signed_thumb]
