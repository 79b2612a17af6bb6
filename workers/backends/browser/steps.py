"""Running a profile's flow steps on a page."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from playwright.async_api import Error as PlaywrightError
from playwright.async_api import Page

from workers.backends.browser.profile import FlowStep, SiteProfile


class SiteFlowError(Exception):
    """A step of a site's flow failed; the message says which and why (a permanent job failure)."""


def css_string(value: str) -> str:
    """``value`` escaped for use inside a double-quoted CSS string (an attribute selector)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\a ")


def fill_in(template: str, values: Mapping[str, str]) -> str:
    # Plain replacement, not str.format: selectors and prompts may hold braces of their own.
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


async def run_steps(
    page: Page, profile: SiteProfile, steps: Iterable[FlowStep], values: Mapping[str, str] | None = None
) -> None:
    """Run ``steps`` in order; a failing step raises SiteFlowError unless it is optional."""
    values = values or {}
    selector_values = {name: css_string(value) for name, value in values.items()}
    for index, step in enumerate(steps):
        try:
            await _run_step(page, profile, step, values, selector_values)
        except SiteFlowError:
            if not step.optional:
                raise
        except PlaywrightError as error:
            if step.optional:
                continue
            if step.error:
                raise SiteFlowError(f"{profile.name}: {fill_in(step.error, values)}") from error
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SiteFlowError(
                f"{profile.name}: step {index + 1} ({step.action} {step.selector or step.value!r}) failed: {first_line}"
            ) from error


async def _run_step(
    page: Page,
    profile: SiteProfile,
    step: FlowStep,
    values: Mapping[str, str],
    selector_values: Mapping[str, str],
) -> None:
    timeout_ms = (step.timeout_s or profile.timeouts.step_s) * 1000
    selector = fill_in(step.selector, selector_values) if step.selector else None
    value = fill_in(step.value, values) if step.value is not None else None
    match step.action:
        case "goto":
            assert value is not None
            await page.goto(profile.url(value), timeout=(step.timeout_s or profile.timeouts.page_load_s) * 1000)
        case "fill":
            assert selector is not None and value is not None
            await page.locator(selector).first.fill(value, timeout=timeout_ms)
        case "type":
            # Key by key, for inputs that ignore a pasted value (search boxes that react to keys).
            assert selector is not None and value is not None
            await page.locator(selector).first.press_sequentially(value, timeout=timeout_ms)
        case "click":
            assert selector is not None
            await page.locator(selector).first.click(timeout=timeout_ms)
        case "press":
            assert value is not None
            if selector:
                await page.locator(selector).first.press(value, timeout=timeout_ms)
            else:
                await page.keyboard.press(value)
        case "wait_for":
            assert selector is not None
            await _wait_for(page, profile, step, selector, timeout_ms, values, selector_values)
        case "wait_for_hidden":
            assert selector is not None
            await page.locator(selector).first.wait_for(state="hidden", timeout=timeout_ms)


async def _wait_for(
    page: Page,
    profile: SiteProfile,
    step: FlowStep,
    selector: str,
    timeout_ms: float,
    values: Mapping[str, str],
    selector_values: Mapping[str, str],
) -> None:
    wanted = page.locator(selector).first
    if step.fail_selector is None:
        await wanted.wait_for(state="visible", timeout=timeout_ms)
        return
    failed = page.locator(fill_in(step.fail_selector, selector_values)).first
    await wanted.or_(failed).first.wait_for(state="visible", timeout=timeout_ms)
    if not await wanted.is_visible():
        reason = fill_in(step.error, values) if step.error else f"{step.fail_selector!r} appeared"
        raise SiteFlowError(f"{profile.name}: {reason}")


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
