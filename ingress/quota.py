"""The caller's usage against the per-key limits (GET /api/quota; the weights.gg /quota shape)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

from ingress.config import QuotaLimits
from projector.queries import UpstreamQuota, Usage
from projector.readside import ReadModel
from schemas.api import Quota, UpstreamQuotaView


async def usage_of(read_model: ReadModel, owner: str) -> Usage:
    return await read_model.usage(owner, datetime.now(UTC).date())


def upstream_views(quotas: list[UpstreamQuota]) -> list[UpstreamQuotaView]:
    return [UpstreamQuotaView(**dataclasses.asdict(quota)) for quota in quotas]


def native_quota(usage: Usage, limits: QuotaLimits, upstream: list[UpstreamQuota]) -> Quota:
    used = {"active_jobs": usage.active_jobs, "daily_images": usage.images_since}
    limit = {"active_jobs": limits.active_jobs, "daily_images": limits.daily_images}
    remaining = {name: max(0, limit[name] - used[name]) for name in used}
    return Quota(usage=used, limits=limit, remaining=remaining, upstream=upstream_views(upstream))


# The weights.gg quota keys imagebus has no such feature for: nothing used, nothing available.
_OTHER_WEIGHTS_KEYS = (
    "QUEUED_COVER_JOBS",
    "QUEUED_SONG_JOBS",
    "QUEUED_VIDEO_JOBS",
    "QUEUED_VOICE_TRAINING_JOBS",
    "QUEUED_IMAGE_TRAINING_JOBS",
    "QUEUED_VIDEO_TRAINING_JOBS",
    "DAILY_COVER_CREATIONS",
    "DAILY_VIDEO_CREATIONS",
    "DAILY_IMAGE_EDITS",
    "DAILY_SONG_CREATIONS",
    "DAILY_FAST_IMAGE_TRAINING_JOBS",
    "VOYAGES_DAILY_IMAGE_CREATIONS",
    "WEEKLY_IMAGE_TRAINING_JOBS",
    "WEEKLY_VIDEO_TRAINING_JOBS",
    "VOYAGES_WEEKLY_IMAGE_TRAINING_JOBS",
    "WEEKLY_VOICE_TRAINING_JOBS",
)


def weights_quota(usage: Usage, limits: QuotaLimits, upstream: list[UpstreamQuota]) -> dict[str, Any]:
    """The weights.gg ``/quota`` object: image keys carry real figures, the rest are zero.

    ``upstream`` adds what the browser backend last read from the site itself (the seed returned
    only that); clients that do not know the field ignore it.
    """
    used: dict[str, int] = {"QUEUED_IMAGE_JOBS": usage.active_jobs, "DAILY_IMAGE_CREATIONS": usage.images_since}
    limit: dict[str, int] = {"QUEUED_IMAGE_JOBS": limits.active_jobs, "DAILY_IMAGE_CREATIONS": limits.daily_images}
    for key in _OTHER_WEIGHTS_KEYS:
        used[key] = 0
        limit[key] = 0
    remaining = {key: max(0, limit[key] - used[key]) for key in limit}
    sites = [view.model_dump(mode="json") for view in upstream_views(upstream)]
    return {"isPremium": True, "usage": used, "limits": limit, "remaining": remaining, "upstream": sites}
