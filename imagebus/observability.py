"""Traces and metrics for a role process: the OpenTelemetry SDK, and a small HTTP endpoint with
``/metrics`` (Prometheus) and ``/health`` for the roles that have no HTTP API of their own.

The endpoint runs on the role's event loop on purpose: if the loop wedges, ``/health`` stops
answering and Kubernetes restarts the pod, which is what a wedged worker needs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

log = structlog.get_logger(__name__)

_REQUEST_TIMEOUT_S = 5.0
_MAX_REQUEST_BYTES = 8192


def configure_tracing(service_name: str, otlp_endpoint: str | None) -> None:
    """Record spans in this process, exporting them over OTLP/HTTP when an endpoint is given.

    Without an endpoint the spans a role still makes are not sent; the ingress and the projector
    then make none (``spans=False`` in imagebus/roles.py) and carry just the trace id into logs and
    message headers.
    """
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if otlp_endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            log.warning("otlp_exporter_missing", hint="pip install 'imagebus[otlp]'", endpoint=otlp_endpoint)
        else:
            endpoint = otlp_endpoint.rstrip("/")
            if not endpoint.endswith("/v1/traces"):
                endpoint += "/v1/traces"
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)


@contextlib.asynccontextmanager
async def metrics_endpoint(host: str, port: int) -> AsyncIterator[int | None]:
    """Serve ``/metrics`` and ``/health`` on ``host:port`` while the block runs (port 0: not at all).

    Yields the port served, or None.
    """
    if port <= 0:
        yield None
        return
    server = await asyncio.start_server(_answer, host, port)
    log.info("metrics_serving", url=f"http://{host}:{port}/metrics")
    try:
        yield port
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2.0)


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT_S)
        method, path, *_ = head[:_MAX_REQUEST_BYTES].decode("latin-1").split(" ", 2)
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            status, content_type, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
        elif path == "/metrics":
            status, content_type, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
        elif path == "/health":
            status, content_type, body = "200 OK", "application/json", b'{"status":"ok"}\n'
        else:
            status, content_type, body = "404 Not Found", "text/plain", b"/metrics or /health\n"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode("latin-1")
        )
        if method != "HEAD":
            writer.write(body)
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, ConnectionError):
        pass  # a scraper that went away or sent junk: nothing to answer
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
