"""Decoding what arrives, where one unreadable message must not stop the stream behind it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import structlog
from pydantic import ValidationError

log = structlog.get_logger(__name__)

T = TypeVar("T")


def decoded_or_none(decode: Callable[[bytes], T], data: bytes, where: str) -> T | None:
    """``decode(data)``, or None (logged with ``where``) for a message no schema version can read."""
    try:
        return decode(data)
    except (ValidationError, ValueError):
        log.exception("unreadable_message", where=where)
        return None
