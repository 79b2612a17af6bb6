"""Site profiles: everything the browser backend knows about one website, as data.

A profile holds the site's URLs, the selectors where things appear, the flow steps of each phase and
the timeouts. A site that changes its page is fixed by editing its profile JSON, not the code.
Step values may use ``{prompt}`` and ``{lora}``; selectors may use ``{lora}`` (CSS-escaped on use).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import urljoin

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

StepAction = Literal["goto", "fill", "type", "click", "press", "wait_for", "wait_for_hidden"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FlowStep(_Frozen):
    """One thing to do on the page."""

    action: StepAction
    selector: str | None = None
    # goto: a URL or a path on the site; fill/type: the text; press: the key ("Enter", "Escape").
    value: str | None = None
    # Seconds this step may take; None: the profile's ``timeouts.step_s``.
    timeout_s: float | None = None
    # wait_for: a selector whose appearance means the step failed (a "no results" line), so a
    # missing thing fails at once instead of at the timeout.
    fail_selector: str | None = None
    # The error to raise when the step fails (may use the placeholders), instead of a generic one.
    error: str | None = None
    # A step that may fail without failing the job (closing a pop-up that is not always there).
    optional: bool = False

    @model_validator(mode="after")
    def _needs(self) -> FlowStep:
        if self.action in ("goto", "fill", "type", "press") and self.value is None:
            raise ValueError(f"a {self.action!r} step needs a value")
        if self.action in ("fill", "type", "click", "wait_for", "wait_for_hidden") and not self.selector:
            raise ValueError(f"a {self.action!r} step needs a selector")
        if self.fail_selector is not None and self.action != "wait_for":
            raise ValueError("only a 'wait_for' step takes a fail_selector")
        return self


class SessionCheck(_Frozen):
    """How to tell a signed-in create page from a login wall, once the page has loaded."""

    signed_in_selector: str
    login_wall_selector: str


class LoraFlow(_Frozen):
    # Steps that apply ``{lora}`` and confirm it is applied (their last step should wait for it to
    # show among the applied LoRAs, with an ``error`` naming it).
    add: tuple[FlowStep, ...]
    # Steps that remove ``{lora}`` and confirm it is gone.
    remove: tuple[FlowStep, ...]
    # The applied LoRAs as the page lists them, and the attribute holding each one's name (None:
    # its text). Read before a job so a LoRA left over from an interrupted job is removed first.
    applied_selector: str | None = None
    applied_name_attribute: str | None = None


class ResultSelectors(_Frozen):
    """Where a generation shows itself on the page."""

    # The final image (an <img>; its src is a URL, a data: URL or a blob: URL).
    image_selector: str
    # The preview the site swaps in while it renders, if it shows one.
    preview_selector: str | None = None
    # An error message the site shows instead of an image (a toast).
    error_selector: str | None = None
    # Errors worth a retry (the site's "busy, try again"): a regex over the error text.
    retryable_error_pattern: str | None = None
    # A progress text and a regex over it with named groups ``percent``, or ``done`` and ``total``.
    progress_selector: str | None = None
    progress_pattern: str | None = None

    @field_validator("retryable_error_pattern", "progress_pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            re.compile(pattern)
        return pattern


class QuotaReading(_Frozen):
    """How to read the account's quota: a page (or JSON endpoint) and a regex over its text."""

    url: str
    # Whose text the pattern reads ("body" for a JSON answer).
    selector: str = "body"
    # Named groups, any of ``used``, ``limit``, ``remaining`` (the missing one is worked out).
    pattern: str
    # Reread after a job when the last reading is older than this.
    max_age_s: float = Field(default=30.0, ge=0)

    @field_validator("pattern")
    @classmethod
    def _has_groups(cls, pattern: str) -> str:
        groups = set(re.compile(pattern).groupindex)
        if not groups & {"used", "limit", "remaining"}:
            raise ValueError("the quota pattern needs a named group: used, limit or remaining")
        return pattern


class Timeouts(_Frozen):
    page_load_s: float = Field(default=30.0, gt=0)
    step_s: float = Field(default=10.0, gt=0)
    # From the Generate click to the final image.
    generation_s: float = Field(default=180.0, gt=0)


class SiteProfile(_Frozen):
    """One website the browser backend drives (see the module docstring)."""

    id: str
    name: str
    base_url: str
    # The create page, absolute or relative to ``base_url``.
    create_url: str
    notes: str = ""
    timeouts: Timeouts = Timeouts()
    session: SessionCheck
    # Steps run after the create page loads, before the first job (open the generator panel).
    open: tuple[FlowStep, ...] = ()
    lora: LoraFlow | None = None
    # Steps that enter ``{prompt}`` and start the generation.
    generate: tuple[FlowStep, ...]
    result: ResultSelectors
    quota: QuotaReading | None = None
    # Seconds between looks at the page while it generates; previews are sent at most this often.
    poll_interval_s: float = Field(default=0.1, gt=0)
    preview_interval_s: float = Field(default=0.5, ge=0)
    max_image_bytes: int = Field(default=32 * 1024 * 1024, gt=0)

    def url(self, path: str) -> str:
        """``path`` resolved against the site's base URL (an absolute URL stays as it is)."""
        return urljoin(self.base_url, path)

    @property
    def create_page(self) -> str:
        return self.url(self.create_url)


def load_site_profile(path: Path) -> SiteProfile:
    """One profile from a JSON file; errors name the file."""
    try:
        return SiteProfile.model_validate_json(path.read_bytes())
    except (OSError, ValueError) as error:
        raise ValueError(f"site profile {path}: {error}") from error


def load_site_profiles(folder: Path) -> dict[str, SiteProfile]:
    """Every ``*.json`` profile in ``folder``, by id."""
    profiles: dict[str, SiteProfile] = {}
    for path in sorted(folder.glob("*.json")):
        profile = load_site_profile(path)
        if profile.id in profiles:
            raise ValueError(f"site profile {path}: id {profile.id!r} is used twice in {folder}")
        profiles[profile.id] = profile
    return profiles
