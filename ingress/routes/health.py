from __future__ import annotations

from litestar import get


@get("/health", summary="Liveness: the process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}
