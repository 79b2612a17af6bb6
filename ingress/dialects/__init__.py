"""The seed APIs, each a thin adapter over the native core (``ingress.jobs``, ``ingress.images``).

One module per seed: it maps the seed's request shapes onto ``JobService``/``ImageService``
and the results back onto the seed's response shapes and status words. No dialect has a
pipeline of its own.
"""

from __future__ import annotations

from typing import Any

from ingress.dialects.chutes import chutes_handlers
from ingress.dialects.cyberimage import cyberimage_router
from ingress.dialects.status import status_handlers
from ingress.dialects.weights import weights_handlers

dialect_handlers: list[Any] = [
    *weights_handlers,  # seeds 000/001 (weights.gg)
    *chutes_handlers,  # seed 002 (Chutes proxy)
    *status_handlers,  # GET /status/{id}: 000/001 and 002, in the job's own dialect
    cyberimage_router,  # seed 003; seed 004 (txt2img) is the native API itself
]
