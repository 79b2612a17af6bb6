"""The seed APIs, each a thin adapter over the native core (``ingress.jobs``, ``ingress.images``).

One module per seed: it maps the seed's request shapes onto ``JobService``/``ImageService``
and the results back onto the seed's response shapes and status words. No dialect has a
pipeline of its own.
"""

from __future__ import annotations

from typing import Any

dialect_handlers: list[Any] = []
