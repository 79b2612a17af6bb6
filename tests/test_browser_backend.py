"""The browser backend against a fake generator website, in Debian's headless Chromium.

Every test serves its own fake site (tests/fakes/site) on a random port and starts its own backend,
which launches its own browser: the faults one test sets never reach another.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.async_api import Browser

from imagebus.sites import SITES_DIR
from schemas import Catalog, GenerationParams, LoraRequest, LoraSpec, ModelSpec
from tests.fakes.site import PASSWORD, USERNAME, FakeSite, final_png, serve_site
from tests.fixtures.browser import CHROMIUM_ARGS, chromium_path
from workers.backends.base import (
    CancelToken,
    GeneratedImage,
    GenerationCanceled,
    JobRequest,
    Progress,
    RetryableError,
)
from workers.backends.browser import BrowserBackend, SiteProfile, load_site_profile, load_site_profiles
from workers.backends.browser.flow import GenerationTimedOut, SiteGenerationError
from workers.backends.browser.session import SiteSessionExpired
from workers.backends.browser.steps import SiteFlowError

FAKE_PROFILE = Path(__file__).parent / "fakes" / "site" / "profile.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The catalog a worker would be given: one model on the fake site, and a LoRA the site knows as
# "Pixel Art" (a LoRA the catalog lacks, like "Neon Noir" below, is searched by its id).
FAKE_CATALOG = Catalog(
    default="fake-model",
    models={"fake-model": ModelSpec(id="fake-model", description="fake", backend="browser", source="", site="fake")},
    loras={"pixel-art": LoraSpec(id="pixel-art", name="Pixel Art", source="fake:pixel-art")},
)


@dataclass
class Site:
    fake: FakeSite
    base_url: str
    profile: SiteProfile
    state_dir: Path

    def with_timeouts(self, **timeouts: float) -> SiteProfile:
        return self.profile.model_copy(update={"timeouts": self.profile.timeouts.model_copy(update=timeouts)})

    def save_state(self, state: dict[str, Any]) -> Path:
        path = self.state_dir / f"{self.profile.id}.json"
        path.write_text(json.dumps(state))
        return path


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    fake = FakeSite()
    async with serve_site(fake) as base_url:
        profile = load_site_profile(FAKE_PROFILE).model_copy(update={"base_url": base_url})
        state_dir = tmp_path / "sessions"
        state_dir.mkdir()
        served = Site(fake, base_url, profile, state_dir)
        served.save_state(fake.storage_state(base_url))
        yield served


@asynccontextmanager
async def running_backend(
    site: Site, profile: SiteProfile | None = None, *, pages: int = 1
) -> AsyncIterator[BrowserBackend]:
    chosen = profile or site.profile
    backend = BrowserBackend.from_catalog(
        FAKE_CATALOG,
        {chosen.id: chosen},
        executable_path=str(chromium_path()),
        pages=pages,
        storage_state_dir=site.state_dir,
        launch_args=CHROMIUM_ARGS,
    )
    try:
        await backend.prepare("fake-model")
        yield backend
    finally:
        await backend.close()


def job(
    prompt: str, *, num_images: int = 1, loras: tuple[str, ...] = (), cancel: CancelToken | None = None
) -> tuple[JobRequest, list[Progress]]:
    progress: list[Progress] = []
    params = GenerationParams(
        prompt=prompt,
        model="fake-model",
        width=512,
        height=512,
        num_inference_steps=20,
        guidance_scale=7.0,
        num_images=num_images,
        loras=tuple(LoraRequest(id=lora) for lora in loras),
    )
    return JobRequest("job-" + prompt[:8].replace(" ", "-"), params, progress.append, cancel or CancelToken()), progress


def assert_site_image(image: GeneratedImage, prompt: str, loras: tuple[str, ...], site: Site) -> None:
    data = image.read_all()
    assert data.startswith(PNG_MAGIC) and image.content_type == "image/png"
    assert (image.width, image.height) == site.fake.image_size
    assert image.length == len(data)
    assert data == final_png(prompt, loras, site.fake.image_size)


@pytest.mark.parametrize("final_image", ["url", "data"])
async def test_a_job_makes_the_sites_images_with_previews_and_reads_the_quota(site: Site, final_image: str) -> None:
    site.fake.final_image = final_image  # type: ignore[assignment]
    async with running_backend(site) as backend:
        assert (backend.name, backend.concurrency, backend.max_batch_images) == ("browser", 1, 1)
        request, progress = job("a lighthouse at dusk", num_images=2)

        images = await backend.generate(request)

        assert len(images) == 2
        for image in images:
            assert_site_image(image, "a lighthouse at dusk", (), site)
        assert [g.prompt for g in site.fake.generations] == ["a lighthouse at dusk"] * 2
        steps = [p.step for p in progress]
        assert steps == sorted(steps) and steps[-1] == 200 and {p.total_steps for p in progress} == {200}
        previews = [p.preview_jpeg for p in progress if p.preview_jpeg]
        assert previews, "the site's preview frames were not reported"
        with Image.open(io.BytesIO(previews[0])) as frame:
            assert frame.format == "JPEG" and max(frame.size) <= 128
        # Both generations counted: 12 used before, 50 a day.
        quota = await backend.site_quota()
        assert quota is not None
        assert (quota.source, quota.used, quota.limit, quota.remaining) == ("fake", 14, 50, 36)
        assert backend.batch_key(request.params) is None
        with pytest.raises(NotImplementedError):
            await backend.generate_batch([request])


async def test_loras_are_applied_for_the_job_and_gone_for_the_next(site: Site) -> None:
    async with running_backend(site) as backend:
        # "pixel-art" is a catalog id the site knows as "Pixel Art"; "Neon Noir" is searched as it is.
        request, _ = job("a city at night", loras=("pixel-art", "Neon Noir"))
        [styled] = await backend.generate(request)
        assert site.fake.generations[-1].loras == ("Pixel Art", "Neon Noir")
        assert_site_image(styled, "a city at night", ("Pixel Art", "Neon Noir"), site)

        request, _ = job("a city at night")
        [plain] = await backend.generate(request)
        assert site.fake.generations[-1].loras == ()
        assert_site_image(plain, "a city at night", (), site)
        assert plain.read_all() != styled.read_all()


async def test_an_unknown_lora_fails_clearly_and_is_never_dropped(site: Site) -> None:
    async with running_backend(site) as backend:
        request, _ = job("a quiet harbour", loras=("Pixel Art", "no-such-style"))
        started = time.monotonic()
        with pytest.raises(SiteFlowError, match="LoRA 'no-such-style' was not found by the site's LoRA search"):
            await backend.generate(request)
        # The site's "no results" line fails it at once, not at the step timeout.
        assert time.monotonic() - started < site.profile.timeouts.step_s
        assert site.fake.generations == [], "the job generated without the LoRA it asked for"

        # The LoRA it did apply is removed again: the next job has none.
        request, _ = job("a quiet harbour")
        [image] = await backend.generate(request)
        assert site.fake.generations[-1].loras == ()
        assert_site_image(image, "a quiet harbour", (), site)


async def test_a_lora_left_applied_in_the_stored_session_is_removed_before_a_job(site: Site) -> None:
    # The operator saved the session while a LoRA was selected (the site keeps it in local storage).
    state = site.fake.storage_state(site.base_url)
    state["origins"] = [{"origin": site.base_url, "localStorage": [{"name": "fake.loras", "value": '["Neon Noir"]'}]}]
    site.save_state(state)
    async with running_backend(site) as backend:
        [image] = await backend.generate(job("a clean slate")[0])
        assert site.fake.generations[-1].loras == ()
        assert_site_image(image, "a clean slate", (), site)


async def test_a_job_cancelled_from_outside_leaves_a_page_the_next_job_can_use(site: Site) -> None:
    site.fake.frames, site.fake.frame_delay_s = 10, 0.3
    async with running_backend(site) as backend:
        running = asyncio.create_task(backend.generate(job("a long night", loras=("pixel-art",))[0]))
        await site.fake.wait_for_generations(1)
        running.cancel()  # the worker shutting down past its grace period
        with pytest.raises(asyncio.CancelledError):
            await running

        site.fake.frame_delay_s = 0.05
        [image] = await backend.generate(job("a short night")[0])
        assert site.fake.generations[-1].loras == ()
        assert_site_image(image, "a short night", (), site)


async def test_a_login_wall_fails_clearly_until_the_stored_session_is_refreshed(site: Site, browser: Browser) -> None:
    state_file = site.state_dir / "fake.json"
    state_file.unlink()
    async with running_backend(site) as backend:
        request, _ = job("a mountain lake")
        with pytest.raises(SiteSessionExpired) as missing:
            await backend.generate(request)
        assert (
            str(missing.value) == f"session for Fake Generator expired: refresh {state_file} (the file does not exist)"
        )

        site.save_state({"cookies": [{**site.fake.storage_state(site.base_url)["cookies"][0], "value": "stale"}]})
        with pytest.raises(SiteSessionExpired, match=rf"^session for Fake Generator expired: refresh {state_file}$"):
            await backend.generate(request)
        assert site.fake.generations == []

        # The operator signs in through the site's own form and saves the session to the file.
        context = await browser.new_context()
        try:
            page = await context.new_page()
            await page.goto(site.base_url + "/login")
            await page.fill("#username", USERNAME)
            await page.fill("#password", PASSWORD)
            await page.click("#login-form button[type=submit]")
            await page.wait_for_url("**/create")
            await context.storage_state(path=state_file)
        finally:
            await context.close()

        [image] = await backend.generate(request)
        assert_site_image(image, "a mountain lake", (), site)


async def test_a_page_that_crashes_mid_generation_is_replaced_and_the_job_retried(site: Site) -> None:
    site.fake.frames, site.fake.frame_delay_s = 8, 0.3
    async with running_backend(site) as backend:
        request, _ = job("a storm over the sea")
        running = asyncio.create_task(backend.generate(request))
        await site.fake.wait_for_generations(1)
        assert backend.browser is not None
        # The job's page (a quota read may have a page of its own open meanwhile).
        [page] = [p for context in backend.browser.contexts for p in context.pages if p.url.endswith("/create")]
        cdp = await page.context.new_cdp_session(page)
        crashed = time.monotonic()
        crash = asyncio.create_task(cdp.send("Page.crash"))  # never answers: the page is gone

        with pytest.raises(
            RetryableError,
            match="the page for Fake Generator was lost mid-job \\(the page crashed\\); a fresh page takes its place",
        ):
            await running
        assert time.monotonic() - crashed < 5
        crash.cancel()

        site.fake.frame_delay_s = 0.05
        [image] = await backend.generate(job("a storm over the sea")[0])
        assert_site_image(image, "a storm over the sea", (), site)


async def test_a_stuck_generation_times_out_with_a_clear_error(site: Site) -> None:
    site.fake.hang_next = True
    async with running_backend(site, site.with_timeouts(generation_s=1.5)) as backend:
        request, _ = job("an endless corridor")
        with pytest.raises(GenerationTimedOut, match=r"the generation did not finish within 1\.5 s"):
            await backend.generate(request)
        # The page is reloaded for the next job, which finishes.
        [image] = await backend.generate(job("an endless corridor")[0])
        assert_site_image(image, "an endless corridor", (), site)


async def test_cancel_mid_generation_stops_at_once_and_leaves_the_page_clean(site: Site) -> None:
    site.fake.frames, site.fake.frame_delay_s = 10, 0.3
    async with running_backend(site) as backend:
        token = CancelToken()
        request, _ = job("a slow sunrise", loras=("pixel-art",), cancel=token)
        previewing = asyncio.Event()
        request.on_progress = lambda progress: previewing.set() if progress.preview_jpeg else None
        running = asyncio.create_task(backend.generate(request))
        await asyncio.wait_for(previewing.wait(), timeout=20)

        # The runtime cancels from its control-message thread, not the loop's.
        canceled_at = time.monotonic()
        threading.Thread(target=token.cancel, args=("user asked",)).start()
        with pytest.raises(GenerationCanceled, match="user asked"):
            await running
        assert time.monotonic() - canceled_at < 3  # includes the page reload and the LoRA removal
        assert not site.fake.generations[0].finished

        site.fake.frame_delay_s = 0.05
        [image] = await backend.generate(job("a quick sunrise")[0])
        assert site.fake.generations[-1].loras == ()
        assert_site_image(image, "a quick sunrise", (), site)


async def test_the_sites_error_message_fails_the_job_and_busy_means_retry(site: Site) -> None:
    async with running_backend(site) as backend:
        site.fake.fail_next = "Filters don't really love your prompt"
        with pytest.raises(
            SiteGenerationError, match=r"^Fake Generator reported: Filters don't really love your prompt$"
        ):
            await backend.generate(job("a forbidden thing")[0])

        site.fake.failure_rate = 1.0
        with pytest.raises(RetryableError, match="Fake Generator reported: The generator is busy"):
            await backend.generate(job("a busy day")[0])

        site.fake.failure_rate = 0.0
        [image] = await backend.generate(job("a calm day")[0])
        assert_site_image(image, "a calm day", (), site)


async def test_two_pages_run_two_jobs_at_once(site: Site) -> None:
    site.fake.frames, site.fake.frame_delay_s = 6, 0.25
    async with running_backend(site, pages=2) as backend:
        assert backend.concurrency == 2  # both pages were opened by prepare()
        one, two = await asyncio.gather(
            backend.generate(job("a red boat", loras=("pixel-art",))[0]), backend.generate(job("a blue boat")[0])
        )
        assert_site_image(one[0], "a red boat", ("Pixel Art",), site)
        assert_site_image(two[0], "a blue boat", (), site)
        # Both were generating on the site at the same time, each on its own page with its own LoRAs.
        red, blue = sorted(site.fake.generations, key=lambda g: g.prompt != "a red boat")
        assert (red.loras, blue.loras) == (("Pixel Art",), ())
        assert max(red.started_at, blue.started_at) < min(red.finished_at or 0, blue.finished_at or 0)


def test_profiles_load_from_json_and_refuse_what_they_cannot_run(tmp_path: Path) -> None:
    shipped = load_site_profiles(SITES_DIR)
    assert set(shipped) == {"weights"}
    assert "untested" in shipped["weights"].notes.lower()
    assert shipped["weights"].create_page == "https://www.weights.com/create"

    broken = json.loads(FAKE_PROFILE.read_text())
    broken["generate"] = [{"action": "fill", "selector": "#prompt"}]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"(?s)broken\.json.*a 'fill' step needs a value"):
        load_site_profiles(tmp_path)

    with pytest.raises(ValueError, match="model 'x' names site 'nowhere', which has no profile"):
        BrowserBackend(shipped, executable_path="/usr/bin/chromium", model_sites={"x": "nowhere"})


def test_the_catalog_names_each_models_site_and_each_loras_search_name() -> None:
    weights = ModelSpec(id="weights-flux", description="weights.com", backend="browser", source="", site="weights")
    other = ModelSpec(id="tiny-sd", description="tiny", source="builtin:tiny-sd")
    lora = LoraSpec(id="pixel-art", name="Pixel Art", source="weights:pixel-art")
    catalog = Catalog(default="tiny-sd", models={m.id: m for m in (weights, other)}, loras={lora.id: lora})
    backend = BrowserBackend.from_catalog(
        catalog, load_site_profiles(SITES_DIR), executable_path="/usr/bin/chromium", pages=3
    )
    assert backend.profile_for("weights-flux").id == "weights"
    assert backend.concurrency == 3
    with pytest.raises(ValueError, match="model 'tiny-sd' has no site profile"):
        BrowserBackend.from_catalog(
            catalog.model_copy(update={"models": {**catalog.models, "x": weights.model_copy(update={"id": "x"})}}),
            {**load_site_profiles(SITES_DIR), "other": load_site_profile(FAKE_PROFILE)},
            executable_path="/usr/bin/chromium",
        ).profile_for("tiny-sd")
