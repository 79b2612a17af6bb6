"""Reading a hosted API's answer status: success, a transient failure, or a permanent one.

Error bodies are read with a small cap and their own message is carried into ours, in whichever
shape the API uses: OpenAI's ``{"error": {"message", "type", "code"}}``, FastAPI's ``{"detail": ...}``
(Chutes), ``{"error": "..."}``, or plain text.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from workers.backends.remote.retry import TransientFailure, is_transient_status, retry_after_s

# Error bodies are short; a server sending megabytes of HTML with its 502 gets cut here.
MAX_ERROR_BODY_BYTES = 64 * 1024
MAX_MESSAGE_CHARS = 500


class RemoteApiError(Exception):
    """The job cannot succeed as asked: the API refused it, or answered something unusable."""


async def raise_for_failure(response: httpx.Response, what: str, *, secrets: tuple[str, ...] = ()) -> None:
    """Nothing for a 2xx; ``TransientFailure`` for 429/5xx; ``RemoteApiError`` for any other status."""
    if response.is_success:
        return
    body = await read_capped(response, MAX_ERROR_BODY_BYTES)
    message = redact(api_message(body) or response.reason_phrase, secrets)
    text = f"{what} answered HTTP {response.status_code}: {message}"
    if is_transient_status(response.status_code):
        raise TransientFailure(text, retry_after_s(response.headers))
    raise RemoteApiError(text)


async def read_capped(response: httpx.Response, limit: int) -> bytes:
    """Up to ``limit`` bytes of a streamed body; the rest is never read."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


def api_message(body: bytes) -> str:
    """The API's own words from an error body, shortened; "" when it has none."""
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        return shorten(body.decode("utf-8", errors="replace"))
    return shorten(_message_in(parsed))


def _message_in(parsed: Any) -> str:
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or "")
            code = error.get("code") or error.get("type")
            return f"{message} ({code})" if code and message else message or str(code or "")
        if isinstance(error, str):
            return error
        detail = parsed.get("detail")
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list):
            # FastAPI validation errors: [{"loc": [...], "msg": "...", "type": "..."}]
            return "; ".join(_validation_item(item) for item in detail)
        plain = parsed.get("message")
        if isinstance(plain, str):
            return plain
    return json.dumps(parsed)


def _validation_item(item: Any) -> str:
    if not isinstance(item, dict):
        return str(item)
    location = ".".join(str(part) for part in item.get("loc", []) if part != "body")
    message = str(item.get("msg", ""))
    return f"{location}: {message}" if location else message


def shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


def redact(text: str, secrets: tuple[str, ...]) -> str:
    """Remove tokens from text that goes into logs and job errors (some APIs echo the key back)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text
