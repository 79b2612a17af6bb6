"""The browser backend: image generation on a website, driven by a site profile (see backend.py)."""

from workers.backends.browser.backend import BrowserBackend
from workers.backends.browser.profile import SiteProfile, load_site_profile, load_site_profiles

__all__ = ["BrowserBackend", "SiteProfile", "load_site_profile", "load_site_profiles"]
