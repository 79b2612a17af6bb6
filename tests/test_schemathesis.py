"""schemathesis over every operation of /docs/openapi.json: no 5xx, no answer outside the document.

The replica is served over real HTTP (uvicorn), so what schemathesis sends is parsed the way a
client's request would be. No workers: jobs stay pending, which is all the routes need.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from storage.object_store import S3Config
from tests.fuzz_campaign import CHECKS, run_campaign
from tests.stack import auth, running_stack, served
from workers.backends.base import Backend

ARTIFACT = Path(__file__).parent / "artifacts" / "schemathesis.json"
# Per operation and phase; enough to reach every parameter's edge cases, small enough for ~30 operations.
MAX_EXAMPLES = 8


async def test_every_operation_keeps_to_its_schema(
    nats_url: str, storage_config: S3Config, tiny_backend: Backend, tmp_path: Path
) -> None:
    async with (
        running_stack(nats_url, storage_config, f"sqlite:///{tmp_path}/rm.db", tiny_backend, workers=0) as stack,
        served(stack.config) as replica,
    ):
        result = await asyncio.to_thread(
            run_campaign, str(replica.base_url).rstrip("/"), headers=auth(), max_examples=MAX_EXAMPLES
        )
        # Still healthy after the campaign.
        assert (await replica.get("/health")).status_code == 200

    ARTIFACT.parent.mkdir(exist_ok=True)
    ARTIFACT.write_text(
        json.dumps(
            {
                "operations": result.operations,
                "cases": result.cases,
                "failures": len(result.failures),
                "checks": list(CHECKS),
                "max_examples": MAX_EXAMPLES,
                "details": [str(failure) for failure in result.failures],
                "slowest": sorted(result.seconds.items(), key=lambda item: -item[1])[:5],
            },
            indent=2,
        )
    )
    assert not result.errors, "\n".join(result.errors)
    assert not result.failures, f"{len(result.failures)} failures:\n" + "\n".join(map(str, result.failures))
    assert result.operations >= 30 and result.cases > 10 * result.operations, result
