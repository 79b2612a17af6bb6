"""The Litestar application: routes, error shapes, OpenAPI at /docs, connections per process."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin

from ingress.config import IngressConfig
from ingress.dialects import dialect_handlers
from ingress.errors import EXCEPTION_HANDLERS
from ingress.hardening import BodyLimits, PlainInput, StreamCap, StreamSlots
from ingress.rate_limit import RateLimiter, RateLimitMiddleware
from ingress.routes.health import health, metrics, ready
from ingress.routes.images import signed_file_handlers
from ingress.routes.keys import keys_router
from ingress.routes.lora_images import LoraPreviews, lora_image_handlers
from ingress.routes.native import native_router
from ingress.routes.web import web_router
from ingress.services import open_services
from ingress.telemetry import RequestTelemetry, sample_queue_depths
from storage.object_store import s3_client


def create_app(config: IngressConfig, *, spans: bool = True) -> Litestar:
    """``spans``: an OpenTelemetry SDK span per request (where an exporter takes them); without,
    requests still carry their trace id into logs and bus headers."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with open_services(config) as services, services.live.running():
            app.state.services = services
            stop = asyncio.Event()
            sampler = asyncio.create_task(
                sample_queue_depths(services.bus, config.catalog, interval_s=config.queue_depth_interval_s, stop=stop)
            )
            try:
                yield
            finally:
                stop.set()
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler

    limiter = RateLimiter(config)
    previews = LoraPreviews(config.lora_previews, s3_client(config.s3) if config.lora_previews else None)
    stream_slots = StreamSlots(config.max_streams)
    return Litestar(
        route_handlers=[
            health,
            ready,
            metrics,
            native_router,
            keys_router,
            *lora_image_handlers,
            *signed_file_handlers,
            *dialect_handlers,
            web_router,
        ],
        state=State({"lora_previews": previews, "stream_slots": stream_slots}),
        # After the services' lifespan, which creates the counters' table.
        lifespan=[lifespan, limiter.lifespan],
        # Hostile input first: refused before anything else is spent on it.
        middleware=[
            # Outermost: every answer is counted and traced, refusals included.
            RequestTelemetry(spans=spans),
            PlainInput(),
            BodyLimits(config.max_body_bytes, config.body_timeout_s),
            RateLimitMiddleware(limiter),
            StreamCap(stream_slots),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=config.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="imagebus",
            version="0.1.0",
            description="Self-hosted image generation over a durable message bus.",
            path="/docs",
            render_plugins=[SwaggerRenderPlugin(path="/"), JsonRenderPlugin(path="/openapi.json")],
        ),
    )
