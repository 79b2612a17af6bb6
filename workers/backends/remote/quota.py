"""An API's rate limit as its ``x-ratelimit-*`` headers tell it, for ``/quota``.

OpenAI sends ``x-ratelimit-{limit,remaining,reset}-requests`` (reset as a duration: "1s", "6m0s",
"20ms"); other APIs send plain ``x-ratelimit-{limit,remaining,reset}`` (reset in seconds, or a Unix
time). The first family present wins.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from workers.backends.base import SiteQuota

_FAMILIES = ("-images", "-requests", "")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# A reset larger than this is a Unix time, not a number of seconds.
_EPOCH_THRESHOLD = 1_000_000_000


def quota_from_headers(source: str, headers: Mapping[str, str], now: datetime | None = None) -> SiteQuota | None:
    now = now or datetime.now(UTC)
    for family in _FAMILIES:
        limit = _integer(headers.get(f"x-ratelimit-limit{family}"))
        remaining = _integer(headers.get(f"x-ratelimit-remaining{family}"))
        if limit is None and remaining is None:
            continue
        used = limit - remaining if limit is not None and remaining is not None else None
        what = family.lstrip("-") or "requests"
        return SiteQuota(
            source=f"{source} ({what})",
            used=used,
            limit=limit,
            remaining=remaining,
            resets_at=_reset_time(headers.get(f"x-ratelimit-reset{family}"), now),
        )
    return None


def _integer(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None else None
    except ValueError:
        return None


def _reset_time(value: str | None, now: datetime) -> datetime | None:
    if not value:
        return None
    value = value.strip()
    try:
        number = float(value)
    except ValueError:
        parts = _DURATION_PART.findall(value)
        if not parts or "".join(amount + unit for amount, unit in parts) != value:
            return None
        return now + timedelta(seconds=sum(float(amount) * _UNITS[unit] for amount, unit in parts))
    if number > _EPOCH_THRESHOLD:
        return datetime.fromtimestamp(number, UTC)
    return now + timedelta(seconds=number)
