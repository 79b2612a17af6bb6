"""Every error leaves the ingress as ``{"status": "error", "message": ...}`` with a 4xx/5xx code."""

from __future__ import annotations

from typing import Any

import structlog
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException

log = structlog.get_logger(__name__)


class ApiError(Exception):
    def __init__(self, status_code: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.headers = headers or {}


def _error(status_code: int, message: str, headers: dict[str, str] | None = None) -> Response[Any]:
    return Response(
        {"status": "error", "message": message},
        status_code=status_code,
        media_type=MediaType.JSON,
        headers=headers,
    )


def _describe_validation(exc: ValidationException) -> str:
    extra = exc.extra if isinstance(exc.extra, list) else []
    problems = []
    for item in extra:
        if not isinstance(item, dict):
            continue
        key = item.get("key") or ""
        message = str(item.get("message", ""))
        problems.append(f"{key}: {message}" if key else message)
    detail = exc.detail or "invalid request"
    if "JSON" in detail or "decode" in detail.lower():
        detail = "malformed JSON body"
    return f"{detail}: " + "; ".join(problems) if problems else detail


def handle_api_error(_: Request[Any, Any, Any], exc: ApiError) -> Response[Any]:
    return _error(exc.status_code, exc.message, exc.headers)


def handle_validation_error(_: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    return _error(400, _describe_validation(exc))


def handle_http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return _error(exc.status_code, exc.detail or "error", dict(exc.headers or {}))


def handle_unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled_error", error=str(exc))
    return _error(500, "internal error")


EXCEPTION_HANDLERS: dict[type[Exception] | int, Any] = {
    ApiError: handle_api_error,
    ValidationException: handle_validation_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
