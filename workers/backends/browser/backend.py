"""The browser backend: a website's own image generator, driven with Playwright in headless Chromium.

Each job takes a page from a pool of N (``concurrency``), runs the site profile's flow on it and
hands the page back clean. A job whose page crashes or closes raises RetryableError after the page
is replaced: the runtime's one ack point then hands the job back for redelivery (bounded by its max
deliveries), rather than a second, hidden retry loop here spending the site's credits again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection, Hashable, Mapping, Sequence
from pathlib import Path

import structlog
from playwright.async_api import Browser
from playwright.async_api import Error as PlaywrightError

from schemas import Catalog, GenerationParams
from workers.backends.base import (
    GeneratedImage,
    GenerationCanceled,
    JobRequest,
    RetryableError,
    SiteQuota,
)
from workers.backends.browser.capture import CapturedImage
from workers.backends.browser.flow import JobRun
from workers.backends.browser.pages import BrowserLaunch, PagePool, PageSlot
from workers.backends.browser.profile import SiteProfile
from workers.backends.browser.quota import read_quota
from workers.backends.browser.session import ensure_signed_in
from workers.backends.browser.steps import first_line

log = structlog.get_logger(__name__)

# Playwright's words for a page that died under a call, when its "crash" event has not landed yet.
_PAGE_GONE_MARKERS = ("crash", "has been closed", "target closed")


class BrowserBackend:
    """Makes images on websites described by site profiles (see ``profile.py``)."""

    name = "browser"
    max_batch_images = 1

    def __init__(
        self,
        profiles: Mapping[str, SiteProfile],
        *,
        executable_path: str,
        pages: int = 2,
        storage_state_dir: Path | None = None,
        headless: bool = True,
        launch_args: Sequence[str] = (),
        model_sites: Mapping[str, str] | None = None,
        lora_names: Mapping[str, str] | None = None,
    ) -> None:
        """``profiles`` by site id; ``model_sites``: catalog model id → site id (each ModelSpec's
        ``site``); ``lora_names``: LoRA catalog id → the name the site knows it by (each LoraSpec's
        ``name``, which is what weights.gg searches by); a LoRA missing there is searched by its id.
        """
        self._profiles = dict(profiles)
        self._model_sites = dict(model_sites or {})
        self._lora_names = dict(lora_names or {})
        for model, site in self._model_sites.items():
            if site not in self._profiles:
                raise ValueError(f"model {model!r} names site {site!r}, which has no profile")
        self._pool = PagePool(BrowserLaunch(executable_path, headless, tuple(launch_args)), pages, storage_state_dir)
        self.concurrency = pages
        self._quotas: dict[str, tuple[float, SiteQuota]] = {}
        self._last_quota: SiteQuota | None = None
        self._quota_locks: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Task[None]] = set()

    @classmethod
    def from_catalog(
        cls,
        catalog: Catalog,
        profiles: Mapping[str, SiteProfile],
        *,
        models: Collection[str] | None = None,
        executable_path: str,
        pages: int = 2,
        storage_state_dir: Path | None = None,
        headless: bool = True,
        launch_args: Sequence[str] = (),
    ) -> BrowserBackend:
        """The backend for the catalog's browser models (``models``: this worker's pool, else all):
        each model's ``site`` picks its profile, each LoRA is searched by its catalog ``name``."""
        specs = [spec for spec in catalog.models.values() if spec.backend == "browser"]
        if models is not None:
            specs = [spec for spec in specs if spec.id in models]
        return cls(
            profiles,
            executable_path=executable_path,
            pages=pages,
            storage_state_dir=storage_state_dir,
            headless=headless,
            launch_args=launch_args,
            model_sites={spec.id: spec.site for spec in specs if spec.site},
            lora_names={lora.id: lora.name for lora in catalog.loras.values()},
        )

    @property
    def browser(self) -> Browser | None:
        """The running Playwright Browser, if started (diagnostics and tests)."""
        return self._pool.browser

    def profile_for(self, model: str) -> SiteProfile:
        site = self._model_sites.get(model)
        if site is None and model in self._profiles:
            site = model
        if site is None and len(self._profiles) == 1:
            site = next(iter(self._profiles))
        if site is None:
            raise ValueError(
                f"model {model!r} has no site profile (known sites: {', '.join(self._profiles) or 'none'})"
            )
        return self._profiles[site]

    async def prepare(self, model: str) -> None:
        """Start the browser and open every page on the model's site, signed in, so jobs start at once."""
        profile = self.profile_for(model)
        state = self._pool.storage_state_file(profile)
        if state is None or not state.exists():
            log.warning("no stored session for the site; jobs will meet its login wall", site=profile.id, file=state)
        await self._pool.start()
        await asyncio.gather(*(self._open_page(profile) for _ in range(self.concurrency)))

    async def _open_page(self, profile: SiteProfile) -> None:
        try:
            async with self._pool.page_for(profile) as slot:
                await ensure_signed_in(self._pool, slot, profile)
        except Exception as error:
            # Not fatal here: each job checks its page again and fails with the reason.
            log.warning("could not open a page on the site", site=profile.id, error=first_line(error))

    async def generate(self, job: JobRequest) -> list[GeneratedImage]:
        profile = self.profile_for(job.params.model)
        job.cancel.raise_if_canceled()
        loop = asyncio.get_running_loop()
        canceled = asyncio.Event()

        def wake() -> None:
            # The token fires on the canceller's thread; the event belongs to this loop.
            loop.call_soon_threadsafe(canceled.set)

        job.cancel.on_cancel(wake)
        names = list(dict.fromkeys(self._lora_names.get(lora.id, lora.id) for lora in job.params.loras))
        async with self._pool.page_for(profile) as slot:
            run = JobRun(self._pool, slot, profile, job, names)
            captured = await self._supervise(run, slot, canceled)
        self._refresh_quota_soon(profile)
        return [GeneratedImage.from_bytes(c.data, c.content_type, c.width, c.height, seed=None) for c in captured]

    async def _supervise(self, run: JobRun, slot: PageSlot, canceled: asyncio.Event) -> list[CapturedImage]:
        """Race the work against a lost page and a cancel; clean the page up whatever happened."""
        work = asyncio.create_task(run.make_images())
        lost = asyncio.create_task(slot.lost.wait())
        stop = asyncio.create_task(canceled.wait())
        started = time.monotonic()
        try:
            await asyncio.wait({work, lost, stop}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            slot.broken = True  # we are being cancelled from outside: do not trust the page
            raise
        finally:
            lost.cancel()
            stop.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(BaseException):
                    await work
        succeeded = not work.cancelled() and work.exception() is None
        if not succeeded:
            error = None if work.cancelled() else work.exception()
            if not slot.lost.is_set() and error is not None and _page_gone(error):
                slot.mark_lost(first_line(error))
        await run.clean_up(interrupted=not succeeded)
        if succeeded:
            return work.result()
        if slot.lost.is_set():
            raise RetryableError(
                f"the page for {run.profile.name} was lost mid-job ({slot.lost_reason}); a fresh page takes "
                "its place and the job goes back to the queue",
                delay_s=1.0,
            )
        if canceled.is_set():
            log.info("browser job canceled", site=run.profile.id, after_s=round(time.monotonic() - started, 3))
            raise GenerationCanceled(run.job.cancel.reason or "canceled")
        error = work.exception()
        assert error is not None
        raise error

    # --- the site's quota --------------------------------------------------------------------------

    async def site_quota(self) -> SiteQuota | None:
        """The quota last read from a site; read now when none has been read yet."""
        if self._last_quota is not None:
            return self._last_quota
        for profile in self._profiles.values():
            if profile.quota is not None:
                return await self.read_quota(profile)
        return None

    async def read_quota(self, profile: SiteProfile) -> SiteQuota | None:
        """Read ``profile``'s quota now (on a context of its own: no job page is taken)."""
        if profile.quota is None:
            return None
        async with self._quota_locks.setdefault(profile.id, asyncio.Lock()):
            quota = await read_quota(await self._pool.side_context(profile), profile)
            self._quotas[profile.id] = (time.monotonic(), quota)
            self._last_quota = quota
            return quota

    def _refresh_quota_soon(self, profile: SiteProfile) -> None:
        if profile.quota is None:
            return
        read_at, _ = self._quotas.get(profile.id, (-float("inf"), None))
        lock = self._quota_locks.get(profile.id)
        if time.monotonic() - read_at < profile.quota.max_age_s or (lock is not None and lock.locked()):
            return
        task = asyncio.create_task(self._refresh_quota(profile))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh_quota(self, profile: SiteProfile) -> None:
        try:
            await self.read_quota(profile)
        except Exception as error:
            log.warning("could not read the site's quota", site=profile.id, error=first_line(error))

    # --- the rest of the protocol ------------------------------------------------------------------

    def batch_key(self, params: GenerationParams) -> Hashable | None:
        return None

    async def generate_batch(self, jobs: list[JobRequest]) -> list[list[GeneratedImage] | BaseException]:
        raise NotImplementedError("the browser backend makes one job at a time per page")

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._pool.close()


def _page_gone(error: BaseException) -> bool:
    """Whether ``error`` (or the Playwright error under it) says the page died."""
    for layer in (error, error.__cause__):
        if isinstance(layer, PlaywrightError) and any(marker in str(layer).lower() for marker in _PAGE_GONE_MARKERS):
            return True
    return False
