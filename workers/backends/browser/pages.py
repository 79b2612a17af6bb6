"""A pool of browser pages, one job on each at a time.

Each page lives in a browser context of its own, built from the site's stored session (a Playwright
storage-state file), so pages never share cookies or local storage and one that breaks can be thrown
away with its context. A page that crashes or closes is marked lost; the job on it notices through
``PageSlot.lost`` and the slot is rebuilt before its next job.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from playwright.async_api import Browser, BrowserContext, Page, Playwright, async_playwright

from workers.backends.browser.profile import SiteProfile

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class BrowserLaunch:
    executable_path: str
    headless: bool = True
    args: Sequence[str] = ()


@dataclass(eq=False)
class PageSlot:
    """One page of the pool and what is known about it."""

    index: int
    site: str | None = None
    context: BrowserContext | None = None
    page: Page | None = None
    # Set when the page crashed or closed under us; a new asyncio.Event per page.
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    lost_reason: str = ""
    # The create page is loaded, signed in and its ``open`` steps ran.
    ready: bool = False
    # Rebuild the context before the next job (after a crash, a timeout, a failed clean-up).
    broken: bool = False

    def mark_lost(self, reason: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()
        self.broken = True
        self.ready = False


class PagePool:
    """N page slots over one Chromium, launched on first use and relaunched if it dies."""

    def __init__(self, launch: BrowserLaunch, size: int, storage_state_dir: Path | None) -> None:
        if size < 1:
            raise ValueError("the browser backend needs at least one page")
        self._launch = launch
        self._storage_state_dir = storage_state_dir
        self._playwright: Playwright | None = None
        self._browser: Browser | None = None
        self._launch_lock = asyncio.Lock()
        self._slots = [PageSlot(index) for index in range(size)]
        # One extra context per site for side reads (its quota page), so they never take a job's page.
        self._side_contexts: dict[str, BrowserContext] = {}
        self._free: asyncio.Queue[PageSlot] = asyncio.Queue()
        for slot in self._slots:
            self._free.put_nowait(slot)

    @property
    def browser(self) -> Browser | None:
        """The running browser, if any (diagnostics and tests)."""
        return self._browser

    def storage_state_file(self, profile: SiteProfile) -> Path | None:
        if self._storage_state_dir is None:
            return None
        return self._storage_state_dir / f"{profile.id}.json"

    async def start(self) -> Browser:
        async with self._launch_lock:
            if self._browser is not None and self._browser.is_connected():
                return self._browser
            if self._playwright is None:
                self._playwright = await async_playwright().start()
            self._browser = await self._playwright.chromium.launch(
                executable_path=self._launch.executable_path,
                headless=self._launch.headless,
                args=list(self._launch.args),
            )
            self._browser.on("disconnected", self._on_browser_gone)
            log.info("browser started", executable=self._launch.executable_path, pages=len(self._slots))
            return self._browser

    def _on_browser_gone(self, browser: Browser) -> None:
        for slot in self._slots:
            slot.mark_lost("the browser went away")

    @contextlib.asynccontextmanager
    async def page_for(self, profile: SiteProfile) -> AsyncIterator[PageSlot]:
        """A slot whose page belongs to ``profile``'s site (new or rebuilt as needed), held for one job."""
        slot = await self._free.get()
        try:
            if slot.broken or slot.site != profile.id or slot.page is None or slot.page.is_closed():
                await self.rebuild(slot, profile)
            yield slot
        finally:
            self._free.put_nowait(slot)

    async def new_context(self, profile: SiteProfile) -> BrowserContext:
        """A context signed in with the site's stored session, read from its file now."""
        browser = await self.start()
        state = self.storage_state_file(profile)
        context = await browser.new_context(storage_state=state if state is not None and state.exists() else None)
        context.set_default_timeout(profile.timeouts.step_s * 1000)
        context.set_default_navigation_timeout(profile.timeouts.page_load_s * 1000)
        return context

    async def side_context(self, profile: SiteProfile) -> BrowserContext:
        context = self._side_contexts.get(profile.id)
        if context is None or context.browser is None or not context.browser.is_connected():
            context = self._side_contexts[profile.id] = await self.new_context(profile)
        return context

    async def rebuild(self, slot: PageSlot, profile: SiteProfile) -> None:
        """A fresh context (from the stored session, read again) and page in ``slot``."""
        await self.discard(slot)
        context = await self.new_context(profile)
        page = await context.new_page()
        slot.site, slot.context, slot.page = profile.id, context, page
        slot.lost, slot.lost_reason, slot.ready, slot.broken = asyncio.Event(), "", False, False
        page.on("crash", lambda _page: self._lost(slot, page, "the page crashed"))
        page.on("close", lambda _page: self._lost(slot, page, "the page was closed"))

    def _lost(self, slot: PageSlot, page: Page, reason: str) -> None:
        if slot.page is page:  # a page we discarded ourselves closes too; that is no loss
            log.warning("browser page lost", slot=slot.index, site=slot.site, reason=reason)
            slot.mark_lost(reason)

    async def discard(self, slot: PageSlot) -> None:
        context, slot.context, slot.page, slot.ready = slot.context, None, None, False
        if context is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(context.close(), timeout=10)

    async def close(self) -> None:
        for slot in self._slots:
            await self.discard(slot)
        for context in self._side_contexts.values():
            with contextlib.suppress(Exception):
                await context.close()
        self._side_contexts.clear()
        if self._browser is not None:
            with contextlib.suppress(Exception):
                await self._browser.close()
            self._browser = None
        if self._playwright is not None:
            with contextlib.suppress(Exception):
                await self._playwright.stop()
            self._playwright = None
