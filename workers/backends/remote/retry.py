"""Retries for calls to a hosted image API: which failures are worth another try, and when.

429, 5xx, timeouts and dropped connections are transient: the call is tried again after an
exponential backoff with jitter, or after the server's own ``Retry-After``. When the tries are spent
the job goes back to the runtime as a ``RetryableError`` (redelivered later, a bounded number of
times). Everything else is the caller's business: a 4xx other than 429 fails the job at once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TypeVar

import httpx
import structlog

from workers.backends.base import RetryableError

log = structlog.get_logger(__name__)

T = TypeVar("T")


class TransientFailure(Exception):
    """A failed try that another try may fix; ``retry_after_s`` is the server's wish, if it said."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class RetryPolicy:
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0
    # Waiting longer than this in-process would hold a job slot for nothing: past it the job is
    # handed back to the runtime at once, with the server's delay (up to max_redelivery_delay_s).
    max_retry_after_s: float = 60.0
    # The redelivery delay suggested to the runtime when the tries are spent and the server named none.
    redelivery_delay_s: float = 30.0
    max_redelivery_delay_s: float = 600.0

    def backoff_s(self, failed_tries: int, retry_after_s: float | None) -> float:
        """Seconds to wait after ``failed_tries`` (1, 2, ...) failures."""
        if retry_after_s is not None:
            # Honour the server, plus a little jitter so jobs told the same instant do not stampede.
            return retry_after_s + random.uniform(0.0, min(1.0, retry_after_s * 0.1))
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (failed_tries - 1))
        return ceiling / 2 + random.uniform(0.0, ceiling / 2)

    def redelivery_delay(self, retry_after_s: float | None) -> float:
        wanted = retry_after_s if retry_after_s is not None else self.redelivery_delay_s
        return min(max(wanted, 0.0), self.max_redelivery_delay_s)


def retry_after_s(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """The server's requested wait: ``Retry-After`` in seconds or as an HTTP date, or ``retry-after-ms``."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(float(millis) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max((moment - (now or datetime.now(UTC))).total_seconds(), 0.0)


def is_transient_status(status: int) -> bool:
    return status == 429 or status >= 500


async def call_with_retries(
    try_once: Callable[[], Awaitable[T]], *, policy: RetryPolicy, max_retries: int, what: str
) -> T:
    """``try_once()`` until it succeeds, retrying transient failures up to ``max_retries`` times."""
    failed_tries = 0
    while True:
        try:
            return await try_once()
        except (TransientFailure, httpx.TransportError, TimeoutError) as exc:
            failure = exc if isinstance(exc, TransientFailure) else TransientFailure(_describe(exc))
        failed_tries += 1
        server_wait = failure.retry_after_s
        if failed_tries > max_retries or (server_wait is not None and server_wait > policy.max_retry_after_s):
            log.warning("remote_gave_up", what=what, tries=failed_tries, error=str(failure))
            raise RetryableError(
                f"{what}: {failure} (gave up after {failed_tries} tries; the job will be retried later)",
                delay_s=policy.redelivery_delay(server_wait),
            )
        delay = policy.backoff_s(failed_tries, server_wait)
        log.info("remote_retry", what=what, tries=failed_tries, delay_s=round(delay, 3), error=str(failure))
        await asyncio.sleep(delay)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "no complete answer in time (timeout)"
    detail = str(exc) or type(exc).__name__
    return f"connection failed ({detail})"
