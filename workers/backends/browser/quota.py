"""Reading an account's quota from a site: its quota page (or JSON endpoint) and a regex."""

from __future__ import annotations

import re

from playwright.async_api import BrowserContext

from workers.backends.base import SiteQuota
from workers.backends.browser.profile import QuotaReading, SiteProfile


class QuotaUnreadable(Exception):
    """The quota page did not show what the profile's pattern looks for."""


async def read_quota(context: BrowserContext, profile: SiteProfile) -> SiteQuota:
    """Open the quota page on a page of its own in ``context`` (the job pages stay where they are)."""
    reading = profile.quota
    if reading is None:
        raise QuotaUnreadable(f"{profile.name} has no quota reading in its profile")
    page = await context.new_page()
    try:
        await page.goto(profile.url(reading.url), timeout=profile.timeouts.page_load_s * 1000)
        text = await page.locator(reading.selector).first.inner_text(timeout=profile.timeouts.step_s * 1000)
    finally:
        await page.close()
    return parse_quota(reading, text, source=profile.id)


def parse_quota(reading: QuotaReading, text: str, *, source: str) -> SiteQuota:
    found = re.search(reading.pattern, text, re.DOTALL)
    if found is None:
        raise QuotaUnreadable(f"{source}: the quota page shows no match for {reading.pattern!r}: {text[:120]!r}")
    numbers = {name: int(value) for name, value in found.groupdict().items() if value is not None}
    used, limit, remaining = numbers.get("used"), numbers.get("limit"), numbers.get("remaining")
    if remaining is None and used is not None and limit is not None:
        remaining = max(0, limit - used)
    if used is None and limit is not None and remaining is not None:
        used = max(0, limit - remaining)
    return SiteQuota(source=source, used=used, limit=limit, remaining=remaining)
