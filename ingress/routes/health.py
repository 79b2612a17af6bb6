"""Probes and metrics: liveness, readiness (the bus and the database answer), Prometheus."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Request, get
from litestar.response import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from ingress.routes.native import services_of

# A dependency slower than this counts as down: a probe must answer well within its own timeout.
READY_CHECK_TIMEOUT_S = 3.0


@get("/health", summary="Liveness: the process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@get(
    "/ready",
    summary="Readiness: the message bus and the read-model database answer (503 while either does not)",
)
async def ready(request: Request[Any, Any, Any]) -> Response[dict[str, str]]:
    services = services_of(request)
    probe_queue = min(spec.queue for spec in services.config.catalog.models.values())
    checks = {
        "message bus": services.bus.command_backlog(probe_queue),
        "database": services.read_model.ping(),
    }
    results = await asyncio.gather(
        *(asyncio.wait_for(check, READY_CHECK_TIMEOUT_S) for check in checks.values()), return_exceptions=True
    )
    down = [
        f"{name}: {type(result).__name__} {result}".strip()
        for name, result in zip(checks, results, strict=True)
        if isinstance(result, BaseException)
    ]
    if down:
        return Response({"status": "error", "message": "not ready: " + "; ".join(down)}, status_code=503)
    return Response({"status": "ready"})


@get("/metrics", include_in_schema=False)
async def metrics() -> Response[bytes]:
    """Prometheus text format: this process's counters (HTTP, submissions, queue depths)."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
