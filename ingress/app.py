"""The Litestar application: routes, error shapes, OpenAPI at /docs, connections per process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin

from ingress.config import IngressConfig
from ingress.dialects import dialect_handlers
from ingress.errors import EXCEPTION_HANDLERS
from ingress.routes.health import health
from ingress.routes.images import signed_file_handlers
from ingress.routes.native import native_router
from ingress.routes.web import web_router
from ingress.services import open_services


def create_app(config: IngressConfig) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with open_services(config) as services:
            app.state.services = services
            yield

    return Litestar(
        route_handlers=[health, native_router, *signed_file_handlers, *dialect_handlers, web_router],
        lifespan=[lifespan],
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
