"""The signed-in session: the create page loaded, a login wall told apart, the stored session restored."""

from __future__ import annotations

import structlog
from playwright.async_api import Error as PlaywrightError

from workers.backends.base import RetryableError
from workers.backends.browser.pages import PagePool, PageSlot
from workers.backends.browser.profile import SiteProfile
from workers.backends.browser.steps import first_line, run_steps

log = structlog.get_logger(__name__)


class SiteSessionExpired(Exception):
    """The stored session no longer signs in; an operator must refresh the storage-state file."""


async def ensure_signed_in(pool: PagePool, slot: PageSlot, profile: SiteProfile) -> None:
    """The slot's page on the site's create page, signed in, its ``open`` steps done."""
    if (
        slot.ready
        and slot.page is not None
        and await slot.page.locator(profile.session.signed_in_selector).first.is_visible()
    ):
        return
    if await open_create_page(slot, profile):
        return
    # A login wall: build the context again from the stored session (an operator may have refreshed
    # the file since), once; a second wall means the session really is gone.
    log.info("login wall; restoring the stored session", site=profile.id, slot=slot.index)
    await pool.rebuild(slot, profile)
    if await open_create_page(slot, profile):
        return
    raise SiteSessionExpired(session_expired_message(pool, profile))


def session_expired_message(pool: PagePool, profile: SiteProfile) -> str:
    state = pool.storage_state_file(profile)
    if state is None:
        return f"session for {profile.name} expired: no storage_state_dir is set, so no session is stored"
    missing = "" if state.exists() else " (the file does not exist)"
    return f"session for {profile.name} expired: refresh {state}{missing}"


async def open_create_page(slot: PageSlot, profile: SiteProfile) -> bool:
    """Load the create page; True when signed in (and the ``open`` steps ran), False on a login wall."""
    if slot.page is None:
        raise RetryableError(f"the page for {profile.name} is gone")
    page, session = slot.page, profile.session
    timeout_ms = profile.timeouts.page_load_s * 1000
    try:
        await page.goto(profile.create_page, timeout=timeout_ms)
        signed_in = page.locator(session.signed_in_selector).first
        wall = page.locator(session.login_wall_selector).first
        await signed_in.or_(wall).first.wait_for(state="visible", timeout=timeout_ms)
    except PlaywrightError as error:
        raise RetryableError(
            f"the create page of {profile.name} did not load ({profile.create_page}): {first_line(error)}",
            delay_s=5.0,
        ) from error
    if not await signed_in.is_visible():
        return False
    await run_steps(page, profile, profile.open)
    slot.ready = True
    return True
