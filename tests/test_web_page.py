"""The web page at /, driven end to end in headless Chromium against a real HTTP replica.

One person's session: enter the key once, submit a prompt, watch previews and the progress bar,
get the image with its expiry countdown and download it, reload (the key is remembered), search
the gallery, ask for a LoRA, cancel a long job, delete from the gallery, page through it.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from playwright.async_api import Browser, Locator, Page, expect

from imagebus.catalog import load_catalog
from schemas import Catalog, LoraSpec
from storage.object_store import S3Config
from tests.slow_backend import StepDelayBackend
from tests.stack import KEY_ALICE, Stack, auth, running_stack, served
from workers.backends.base import Backend

ARTIFACTS = Path(__file__).parent / "artifacts"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def catalog_with_a_lora() -> Catalog:
    """The shipped catalog, with tiny-sd taking LoRAs and one LoRA that no worker can load."""
    catalog = load_catalog()
    tiny = catalog.models["tiny-sd"].model_copy(update={"supports_lora": True})
    lora = LoraSpec(
        id="pixel-art",
        name="Pixel Art",
        source="/nonexistent/pixel-art.safetensors",
        tags=("style", "8-bit"),
        trigger_words=("pixel art",),
    )
    return catalog.model_copy(update={"models": {**catalog.models, "tiny-sd": tiny}, "loras": {lora.id: lora}})


async def test_the_page_generates_with_live_progress_searches_the_gallery_and_cancels(
    storage_config: S3Config, tiny_backend: Backend, browser: Browser, tmp_path: Path
) -> None:
    backend = StepDelayBackend(tiny_backend, step_delay_s=0.15)
    # The page's replica knows one LoRA (the worker cannot load it: that job must fail, saying so).
    async with (
        running_stack("memory://web", storage_config, f"sqlite:///{tmp_path}/rm.db", backend) as stack,
        served(dataclasses.replace(stack.config, catalog=catalog_with_a_lora())) as replica,
    ):
        context = await browser.new_context(base_url=str(replica.base_url), viewport={"width": 1280, "height": 1000})
        # Generous waits: this runs beside a worker and the servers on a 2-core machine.
        context.set_default_timeout(15_000)
        expect.set_options(timeout=15_000)
        page = await context.new_page()
        page_errors: list[str] = []
        page.on("pageerror", lambda error: page_errors.append(str(error)))
        try:
            await enter_the_key_once(page)
            await generate_and_watch_it_run(page)
            await reload_and_search_the_gallery(page)
            await ask_for_a_lora_that_cannot_be_applied(page)
            await cancel_a_long_job_after_a_reload(page, stack)
            await delete_from_the_gallery(page, stack)
            await page_through_the_gallery(page)
            assert page_errors == []
        finally:
            await context.close()


async def enter_the_key_once(page: Page) -> None:
    await page.goto("/")
    await expect(page.locator("body")).to_have_attribute("data-ready", "true")
    await expect(page.locator("#model")).to_have_value("tiny-sd")
    # A wrong key is refused with the API's own message; the right one is kept.
    await page.fill("#api-key", "not-a-key")
    await page.click("#key-form button[type=submit]")
    await expect(page.locator("#notice")).to_contain_text("invalid API key")
    await page.fill("#api-key", KEY_ALICE)
    await page.click("#key-form button[type=submit]")
    await expect(page.locator("#key-saved")).to_be_visible()
    await expect(page.locator("#notice")).to_be_hidden()
    await expect(page.locator("body")).to_have_attribute("data-gallery-live", "true")


async def generate_and_watch_it_run(page: Page) -> None:
    await submit(page, "a red fox in snow", steps=30, seed=7)
    job = page.locator(".job", has_text="a red fox in snow")
    preview = job.locator(".job-preview")
    await expect(preview).to_be_visible(timeout=20_000)
    assert (await preview.get_attribute("src") or "").startswith("data:image/jpeg;base64,")
    seen = {await progress_of(job)}
    while await job.get_attribute("data-status") == "processing" and len(seen) < 3:
        await page.wait_for_timeout(150)
        seen.add(await progress_of(job))
    assert len(seen) >= 2, f"the progress bar did not move: {seen}"
    await expect(job).to_have_attribute("data-status", "completed", timeout=30_000)
    assert await progress_of(job) == 100
    await expect(job.locator(".job-detail")).to_contain_text("1 image")

    result = job.locator(".image-card")
    await expect(result).to_have_count(1)
    await expect(result.locator("img")).to_have_js_property("naturalWidth", 64)  # the bytes really loaded
    await expect(result.locator(".countdown")).to_have_text(re.compile(r"Expires in (9|10):\d\d"))
    async with page.expect_download() as download_info:
        await result.locator("a.download").click()
    downloaded = await (await download_info.value).path()
    assert downloaded.read_bytes().startswith(PNG_MAGIC)

    # The live gallery shows the new image without a reload.
    await expect(page.locator("#gallery-grid .image-card")).to_have_count(1)
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "web-page.png"), full_page=True)


async def reload_and_search_the_gallery(page: Page) -> None:
    await page.reload()
    await expect(page.locator("body")).to_have_attribute("data-ready", "true")
    await expect(page.locator("#key-saved")).to_be_visible()
    await expect(page.locator("#key-form")).to_be_hidden()
    gallery = page.locator("#gallery-grid .image-card")
    await expect(gallery).to_have_count(1)
    await expect(gallery.locator(".caption")).to_have_text("a red fox in snow")
    await expect(gallery.locator(".countdown")).to_have_text(re.compile(r"Expires in \d+:\d\d"))

    await search_gallery(page, "fox")
    await expect(page.locator("#gallery-status")).to_have_text("1 image")
    await expect(gallery).to_have_count(1)
    await search_gallery(page, "zebra")
    await expect(page.locator("#gallery-status")).to_contain_text("No images match “zebra”")
    await expect(gallery).to_have_count(0)
    await search_gallery(page, "")
    await expect(gallery).to_have_count(1)


async def ask_for_a_lora_that_cannot_be_applied(page: Page) -> None:
    await page.fill("#lora-search", "8-bit")
    found = page.locator("#lora-results li", has_text="Pixel Art")
    await expect(found).to_have_count(1)
    await found.get_by_role("button", name="Add").click()
    await page.fill('#lora-selected tr[data-lora-id="pixel-art"] .lora-weight', "0.8")
    async with page.expect_request(lambda r: r.url.endswith("/api/generate") and r.method == "POST") as sent:
        await submit(page, "a pixel art castle", steps=4)
    body = (await sent.value).post_data_json
    assert body is not None and body["loras"] == [{"id": "pixel-art", "weight": 0.8, "trigger_weight": 1}], body

    job = page.locator(".job", has_text="a pixel art castle")
    await expect(job).to_have_attribute("data-status", "failed", timeout=20_000)
    await expect(job.locator(".job-detail")).to_contain_text("cannot be applied")
    await expect(page.locator("#notice")).to_contain_text("pixel-art cannot be applied")
    await page.click("#notice-close")
    await expect(page.locator("#notice")).to_be_hidden()
    await page.get_by_role("button", name="Remove").click()
    await expect(page.locator("#lora-selected")).to_be_hidden()


async def cancel_a_long_job_after_a_reload(page: Page, stack: Stack) -> None:
    await submit(page, "a lighthouse in a storm", steps=50)
    job = page.locator(".job", has_text="a lighthouse in a storm")
    await expect(job).to_have_attribute("data-status", "processing", timeout=20_000)
    await page.reload()  # the running job gets its card and stream back
    await expect(job).to_have_attribute("data-status", "processing")
    await expect(job.locator(".progress")).not_to_have_attribute("aria-valuenow", "0")
    await job.locator(".job-cancel").click()
    await expect(job).to_have_attribute("data-status", "canceled", timeout=20_000)
    assert await progress_of(job) < 100
    await expect(job.locator(".job-cancel")).to_be_hidden()
    await expect(job.locator(".image-card")).to_have_count(0)
    await expect(page.locator("#notice")).to_be_hidden()

    answer = await stack.client.get(f"/api/jobs/{await job.get_attribute('data-job-id')}", headers=auth())
    assert answer.json()["status"] == "canceled"
    await expect(page.locator("#gallery-grid .image-card")).to_have_count(1)  # nothing of it in the gallery


async def delete_from_the_gallery(page: Page, stack: Stack) -> None:
    image = page.locator("#gallery-grid .image-card")
    image_id = await image.get_attribute("data-image-id")
    await image.get_by_role("button", name="Delete").click()
    await image.get_by_role("button", name="Confirm delete").click()  # a second click confirms
    await expect(image).to_have_count(0)
    gone = await stack.client.get(f"/api/images/{image_id}", headers=auth())
    assert gone.status_code in (404, 410), gone.text


async def page_through_the_gallery(page: Page) -> None:
    """13 new images arrive live: page 1 keeps the newest 12, the 13th is one page older."""
    await submit(page, "a field of tulips", steps=2, images=8)
    await expect(page.locator(".job", has_text="tulips")).to_have_attribute("data-status", "completed", timeout=20_000)
    await submit(page, "a bunch of roses", steps=2, images=5)
    await expect(page.locator(".job", has_text="roses")).to_have_attribute("data-status", "completed", timeout=20_000)
    images = page.locator("#gallery-grid .image-card")
    await expect(page.locator("#gallery-status")).to_have_text("13 images")
    await expect(images).to_have_count(12)
    await expect(images.first.locator(".caption")).to_have_text("a bunch of roses")
    await expect(page.locator("#gallery-prev")).to_be_disabled()
    await page.click("#gallery-next")
    await expect(page.locator("#gallery-page")).to_have_text("Page 2 of 2")
    await expect(images).to_have_count(1)
    await expect(images.locator(".caption")).to_have_text("a field of tulips")
    await expect(page.locator("#gallery-next")).to_be_disabled()
    await page.click("#gallery-prev")
    await expect(images).to_have_count(12)


async def submit(page: Page, prompt: str, *, steps: int, images: int = 1, seed: int | None = None) -> None:
    await page.fill("#prompt", prompt)
    await page.select_option("#model", "tiny-sd")
    await page.fill("#width", "64")
    await page.fill("#height", "64")
    await page.fill("#steps", str(steps))
    await page.fill("#num-images", str(images))
    await page.fill("#seed", "" if seed is None else str(seed))
    await page.click("#generate")


async def search_gallery(page: Page, text: str) -> None:
    await page.fill("#gallery-search", text)
    await page.press("#gallery-search", "Enter")


async def progress_of(job: Locator) -> int:
    return int(await job.locator(".progress").get_attribute("aria-valuenow") or 0)
