"""Site profiles shipped for the browser backend: one JSON file per site (see workers/backends/browser)."""

from pathlib import Path

SITES_DIR = Path(__file__).parent
