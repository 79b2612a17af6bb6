"""Every request's metrics and span: counted by route template, method and status code, timed
to its first byte, and traced in the caller's W3C trace context when it sends one (else a new
trace starts here and follows the job through the bus)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping

import structlog
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from opentelemetry.trace import SpanKind, Status, StatusCode

from bus import Bus
from bus.tracing import trace_context, tracer
from schemas import Catalog
from schemas.metrics import HTTP_REQUEST_DURATION, HTTP_REQUESTS, QUEUE_DEPTH

log = structlog.get_logger(__name__)

# Requests no route matched have no template; one label value keeps the series bounded.
_UNMATCHED = "<unmatched>"


class RequestTelemetry(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        route = str(scope.get("path_template") or _UNMATCHED)
        method = str(scope.get("method", "GET"))
        started = time.perf_counter()
        code = 500  # unless a response starts or an exception says otherwise
        first_byte: float | None = None

        async def timed_send(message: Message) -> None:
            nonlocal code, first_byte
            if message["type"] == "http.response.start":
                code = int(message["status"])
                first_byte = time.perf_counter()
            await send(message)

        headers = _headers(scope)
        with tracer.start_as_current_span(
            f"{method} {route}",
            context=trace_context(headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route},
        ) as span:
            try:
                await next_app(scope, receive, timed_send)
            except Exception as exc:
                # Raised through us to Litestar's handlers, which turn it into the response.
                code = int(getattr(exc, "status_code", 500))
                raise
            finally:
                span.set_attribute("http.response.status_code", code)
                if code >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                HTTP_REQUESTS.labels(route, method, str(code)).inc()
                HTTP_REQUEST_DURATION.labels(route, method).observe((first_byte or time.perf_counter()) - started)


def _headers(scope: Scope) -> Mapping[str, str]:
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope.get("headers", [])}


async def sample_queue_depths(bus: Bus, catalog: Catalog, *, interval_s: float, stop: asyncio.Event) -> None:
    """Set imagebus_queue_depth for every queue of the catalog every ``interval_s`` until ``stop``.

    Every ingress replica samples (the ingress always runs, while worker pools may be scaled to
    zero); alerts and dashboards take the max over replicas.
    """
    queues = {spec.queue: spec.backend for spec in catalog.models.values()}
    while not stop.is_set():
        for queue, backend in sorted(queues.items()):
            try:
                QUEUE_DEPTH.labels(backend, queue).set(await bus.command_backlog(queue))
            except Exception as exc:
                log.warning("queue_depth_unknown", queue=queue, error=str(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
