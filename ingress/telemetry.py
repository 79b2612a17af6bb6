"""Every request's metrics and trace: counted by route template, method and status code, timed
to its first byte, and traced in the caller's W3C trace context when it sends one (else a new
trace starts here and follows the job through the bus).

A request gets an OpenTelemetry SDK span only where an exporter takes it (``spans``); otherwise
it gets just a span context (the caller's trace id, or a new one, and a span id of its own),
which is all its log lines and the bus headers of what it publishes need, at a fraction of the
cost of a span nobody reads."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Mapping

import structlog
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    INVALID_SPAN_CONTEXT,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from bus import Bus
from bus.tracing import TRACE_HEADERS, attached, trace_context, tracer
from schemas import Catalog
from schemas.metrics import HTTP_REQUEST_DURATION, HTTP_REQUESTS, QUEUE_DEPTH

log = structlog.get_logger(__name__)

# Requests no route matched have no template; one label value keeps the series bounded.
_UNMATCHED = "<unmatched>"
# ASGI header names arrive lower case, as these are.
_TRACE_HEADER_NAMES = frozenset(name.encode("latin-1") for name in TRACE_HEADERS)


class RequestTelemetry(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    def __init__(self, *, spans: bool = True) -> None:
        # SDK spans per request: worth making only where an exporter sends them somewhere.
        self._spans = spans

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        route = str(scope.get("path_template") or _UNMATCHED)
        method = str(scope.get("method", "GET"))
        if not self._spans:
            with attached(_unexported(scope)):
                await _served(scope, receive, send, next_app, route, method, None)
            return
        with tracer.start_as_current_span(
            f"{method} {route}",
            context=trace_context(_headers(scope)),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route},
        ) as span:
            await _served(scope, receive, send, next_app, route, method, span)


async def _served(
    scope: Scope, receive: Receive, send: Send, next_app: ASGIApp, route: str, method: str, span: Span | None
) -> None:
    started = time.perf_counter()
    code = 500  # unless a response starts or an exception says otherwise
    first_byte: float | None = None

    async def timed_send(message: Message) -> None:
        nonlocal code, first_byte
        if message["type"] == "http.response.start":
            code = int(message["status"])
            first_byte = time.perf_counter()
        await send(message)

    try:
        await next_app(scope, receive, timed_send)
    except Exception as exc:
        # Raised through us to Litestar's handlers, which turn it into the response.
        code = int(getattr(exc, "status_code", 500))
        raise
    finally:
        if span is not None:
            span.set_attribute("http.response.status_code", code)
            if code >= 500:
                span.set_status(Status(StatusCode.ERROR))
        HTTP_REQUESTS.labels(route, method, str(code)).inc()
        HTTP_REQUEST_DURATION.labels(route, method).observe((first_byte or time.perf_counter()) - started)


def _headers(scope: Scope) -> Mapping[str, str]:
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope.get("headers", [])}


def _unexported(scope: Scope) -> otel_context.Context:
    """The request's trace without an SDK span: the caller's trace (id, flags, state) continued
    under a new span id, or a new sampled trace, as the SDK's default sampler would start it, so
    a role downstream that does export still records the job."""
    carrier = {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in scope.get("headers", [])
        if name in _TRACE_HEADER_NAMES
    }
    context = trace_context(carrier) if carrier else None
    parent = trace.get_current_span(context).get_span_context() if carrier else INVALID_SPAN_CONTEXT
    if parent.is_valid:
        trace_id, flags, state = parent.trace_id, parent.trace_flags, parent.trace_state
    else:
        trace_id, flags, state = _nonzero_bits(128), TraceFlags(TraceFlags.SAMPLED), None
    span_context = SpanContext(trace_id, _nonzero_bits(64), is_remote=False, trace_flags=flags, trace_state=state)
    return trace.set_span_in_context(NonRecordingSpan(span_context), context)


def _nonzero_bits(bits: int) -> int:
    # W3C ids must not be all zeros (the SDK's RandomIdGenerator draws the same way).
    while not (value := random.getrandbits(bits)):
        pass
    return value


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
