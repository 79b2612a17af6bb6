"""One job on one page: signed-in session, LoRAs, prompt, generate, previews, final image, clean-up.

``JobRun.make_images`` does the work and may be cancelled at any await (a cancel, a crashed page);
``JobRun.clean_up`` runs afterwards in every case and leaves the page as the next job needs it: no
LoRA of this job left applied, and the create page reloaded when the work was interrupted.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import Page

from workers.backends.base import JobRequest, Progress, RetryableError
from workers.backends.browser.capture import (
    CapturedImage,
    ImageCaptureError,
    describe_image,
    preview_jpeg,
    read_image_bytes,
)
from workers.backends.browser.pages import PagePool, PageSlot
from workers.backends.browser.profile import SiteProfile
from workers.backends.browser.session import ensure_signed_in, open_create_page
from workers.backends.browser.steps import SiteFlowError, first_line, run_steps

log = structlog.get_logger(__name__)

# Progress is reported in percent of each image: step = images done * 100 + percent of the current one.
STEPS_PER_IMAGE = 100
SEEN = "data-imagebus-seen"

# What a generation looks like right now, in one round trip.
_LOOK_JS = """([image, preview, error, progress, seen]) => {
  const srcOf = (el) => (el && el.getAttribute("src") ? el.src : null);
  const img = document.querySelector(image);
  const err = error ? [...document.querySelectorAll(error)].find(
    (el) => !el.hasAttribute(seen) && el.getClientRects().length > 0 && el.textContent.trim()) : null;
  const bar = progress ? document.querySelector(progress) : null;
  return {
    image: srcOf(img),
    image_fresh: !!img && !img.hasAttribute(seen),
    image_loaded: !!img && img.complete && img.naturalWidth > 0,
    preview: preview ? srcOf(document.querySelector(preview)) : null,
    error: err ? err.textContent.trim() : null,
    progress: bar ? bar.textContent : null,
  };
}"""

# Marks the current result and error messages, so only what the next generation shows counts.
_MARK_SEEN_JS = """([selectors, seen]) => {
  for (const selector of selectors) for (const el of document.querySelectorAll(selector)) el.setAttribute(seen, "1");
}"""

_APPLIED_LORAS_JS = """([selector, attribute]) => [...document.querySelectorAll(selector)]
  .map((el) => (attribute ? el.getAttribute(attribute) : el.textContent) || "").map((name) => name.trim())
  .filter(Boolean)"""


@dataclass(frozen=True)
class PageLook:
    """One look at a generating page."""

    image: str | None  # the final image's src, if one shows
    image_fresh: bool  # that <img> appeared after the Generate click
    image_loaded: bool
    preview: str | None
    error: str | None  # an error message shown after the Generate click
    progress: str | None


class SiteGenerationError(Exception):
    """The site refused or failed the generation and said why."""


class GenerationTimedOut(Exception):
    """The site started a generation and never delivered the image."""


@dataclass
class JobRun:
    pool: PagePool
    slot: PageSlot
    profile: SiteProfile
    job: JobRequest
    # The names the site knows the job's LoRAs by, in the job's order.
    lora_names: Sequence[str]
    # LoRAs applied on the page for this job, so clean-up removes exactly those.
    applied: list[str] = field(default_factory=list)
    images_done: int = 0

    @property
    def page(self) -> Page:
        if self.slot.page is None:
            raise RetryableError(f"the page for {self.profile.name} is gone")
        return self.slot.page

    async def make_images(self) -> list[CapturedImage]:
        await ensure_signed_in(self.pool, self.slot, self.profile)
        await self.apply_loras()
        images = []
        for _ in range(self.job.params.num_images):
            images.append(await self.generate_one())
            self.images_done += 1
        return images

    # --- LoRAs -----------------------------------------------------------------------------------

    async def applied_loras(self) -> list[str]:
        flow = self.profile.lora
        if flow is None or flow.applied_selector is None:
            return []
        names: list[str] = await self.page.evaluate(
            _APPLIED_LORAS_JS, [flow.applied_selector, flow.applied_name_attribute]
        )
        return names

    async def apply_loras(self) -> None:
        flow = self.profile.lora
        if not self.lora_names:
            if flow is not None:
                await self.remove_loras(await self.applied_loras())  # left over from an interrupted job
            return
        if flow is None:
            raise SiteFlowError(f"{self.profile.name} takes no LoRAs (its profile has no LoRA flow)")
        already = await self.applied_loras()
        await self.remove_loras([name for name in already if name not in self.lora_names])
        for name in self.lora_names:
            if name in already:
                self.applied.append(name)
                continue
            # Noted before the steps run: a half-applied LoRA is removed by the clean-up too.
            self.applied.append(name)
            await run_steps(self.page, self.profile, flow.add, {"lora": name, "prompt": self.job.params.prompt})

    async def remove_loras(self, names: Sequence[str]) -> None:
        flow = self.profile.lora
        if flow is None:
            return
        for name in names:
            await run_steps(self.page, self.profile, flow.remove, {"lora": name, "prompt": self.job.params.prompt})

    # --- one image -------------------------------------------------------------------------------

    async def generate_one(self) -> CapturedImage:
        page, result = self.page, self.profile.result
        before = await self.look()
        await page.evaluate(_MARK_SEEN_JS, [[s for s in (result.image_selector, result.error_selector) if s], SEEN])
        await run_steps(page, self.profile, self.profile.generate, {"prompt": self.job.params.prompt})

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.profile.timeouts.generation_s
        cleared = False  # the old image went away: whatever shows up next is new
        last_preview: str | None = None
        last_sent = -float("inf")
        percent = 0
        self.report(percent)
        while True:
            now = await self.look()
            if now.error:
                raise self.site_error(now.error)
            image = now.image
            cleared = cleared or image is None
            if image and now.image_loaded and (now.image_fresh or cleared or image != before.image):
                captured = await self.capture(image)
                self.report(STEPS_PER_IMAGE)
                return captured
            percent = max(percent, self.read_percent(now.progress))
            preview = now.preview
            if preview and preview != last_preview and loop.time() - last_sent >= self.profile.preview_interval_s:
                last_preview, last_sent = preview, loop.time()
                self.report(percent, await self.read_preview(preview))
            if loop.time() >= deadline:
                raise GenerationTimedOut(
                    f"{self.profile.name}: the generation did not finish within "
                    f"{self.profile.timeouts.generation_s:g} s (no new image at {result.image_selector!r})"
                )
            await asyncio.sleep(self.profile.poll_interval_s)

    async def look(self) -> PageLook:
        result = self.profile.result
        looked: dict[str, Any] = await self.page.evaluate(
            _LOOK_JS,
            [result.image_selector, result.preview_selector, result.error_selector, result.progress_selector, SEEN],
        )
        return PageLook(**looked)

    def site_error(self, text: str) -> Exception:
        pattern = self.profile.result.retryable_error_pattern
        message = f"{self.profile.name} reported: {text}"
        if pattern and re.search(pattern, text):
            return RetryableError(message, delay_s=10.0)
        return SiteGenerationError(message)

    def read_percent(self, text: str | None) -> int:
        pattern = self.profile.result.progress_pattern
        if text is None or not pattern:
            return 0
        found = re.search(pattern, text)
        if found is None:
            return 0
        groups = found.groupdict()
        if groups.get("percent") is not None:
            return min(99, int(float(groups["percent"])))
        if groups.get("done") is not None and groups.get("total"):
            return min(99, int(100 * int(groups["done"]) / max(1, int(groups["total"]))))
        return 0

    def report(self, percent: int, preview: bytes | None = None) -> None:
        total = self.job.params.num_images * STEPS_PER_IMAGE
        self.job.on_progress(Progress(self.images_done * STEPS_PER_IMAGE + percent, total, preview))

    async def read_preview(self, url: str) -> bytes | None:
        try:
            return preview_jpeg(await read_image_bytes(self.page, url, max_bytes=self.profile.max_image_bytes))
        except (PlaywrightError, ImageCaptureError) as error:
            # A frame the page already dropped (a revoked blob: URL); the next one will do.
            log.debug("preview unreadable", site=self.profile.id, error=first_line(error))
            return None

    async def capture(self, url: str) -> CapturedImage:
        try:
            data = await read_image_bytes(self.page, url, max_bytes=self.profile.max_image_bytes)
        except PlaywrightError as error:
            raise ImageCaptureError(
                f"{self.profile.name}: could not read the final image: {first_line(error)}"
            ) from error
        return describe_image(data, f"{self.profile.name}'s final image")

    # --- afterwards ------------------------------------------------------------------------------

    async def clean_up(self, *, interrupted: bool) -> None:
        """Leave the page for the next job; when that cannot be done, have the slot rebuilt."""
        if self.slot.lost.is_set() or self.slot.page is None:
            self.slot.broken = True
            return
        try:
            async with asyncio.timeout(self.profile.timeouts.page_load_s + 2 * self.profile.timeouts.step_s):
                if interrupted:
                    # A generation may still be running on the page: reloading stops it.
                    self.slot.ready = False
                    if not await open_create_page(self.slot, self.profile):
                        self.slot.broken = True
                        return
                leftover = list(reversed(self.applied))
                if self.profile.lora is not None and self.profile.lora.applied_selector is not None:
                    # Only what the page shows: a LoRA whose adding failed has no remove button.
                    shown = await self.applied_loras()
                    leftover = [name for name in leftover if name in shown]
                await self.remove_loras(leftover)
        except Exception as error:
            log.warning(
                "page clean-up failed; it will be rebuilt",
                site=self.profile.id,
                slot=self.slot.index,
                loras=self.applied,
                error=first_line(error),
            )
            self.slot.broken = True
