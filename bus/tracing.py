"""W3C trace context in message headers, so one job is one trace from the HTTP request through
the worker to the projector.

Every adapter puts the current span's ``traceparent`` (and ``tracestate``) on what it publishes
and hands the headers of what it delivers back to the consumer, which continues the trace from
them. Spans are recorded only where a role configured the OpenTelemetry SDK
(``imagebus.observability``); without it the trace id still passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

# Exactly W3C trace context: no environment-chosen propagators, so every role agrees.
_PROPAGATOR = TraceContextTextMapPropagator()
TRACE_HEADERS = frozenset(_PROPAGATOR.fields)

tracer = trace.get_tracer("imagebus")


def trace_headers() -> dict[str, str]:
    """The headers carrying the current span (empty when there is none)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier


def trace_context(headers: Mapping[str, Any] | None) -> otel_context.Context:
    """The context a received message's headers continue (empty: a new trace starts there)."""
    return _PROPAGATOR.extract(carried(headers))


def carried(headers: Mapping[str, Any] | None) -> dict[str, str]:
    """Only the trace headers of ``headers`` (what a delivery keeps of its message's headers)."""
    return {
        name.lower(): value.decode() if isinstance(value, bytes) else str(value)
        for name, value in (headers or {}).items()
        if name.lower() in TRACE_HEADERS
    }


@contextmanager
def attached(context: otel_context.Context) -> Iterator[None]:
    """Make ``context`` current for the block (publishes in it carry its trace)."""
    token = otel_context.attach(context)
    try:
        yield
    finally:
        otel_context.detach(token)


def trace_id_of(context: otel_context.Context | None = None) -> str | None:
    """The trace id (32 hex digits) of ``context``'s span, or of the current span."""
    span_context = trace.get_current_span(context).get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None
