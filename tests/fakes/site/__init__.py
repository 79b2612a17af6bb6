"""A fake image-generator website (login wall, LoRA search, previews, final image, quota, faults)."""

from tests.fakes.site.app import COOKIE, PASSWORD, USERNAME, FakeSite, Generation, create_app, final_png, serve_site

__all__ = ["COOKIE", "PASSWORD", "USERNAME", "FakeSite", "Generation", "create_app", "final_png", "serve_site"]
