"""A schemathesis campaign against a running ingress: every operation of its OpenAPI document.

Shared by ``tests/test_schemathesis.py`` (short, with a valid key) and ``bench/fuzz.py`` (longer,
also keyless and with a wrong key). Schemathesis is synchronous (``requests``): call
``run_campaign`` from a thread while the server runs in the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events, from_schema

# What "the API keeps its word" means here: no 5xx, and every answer is one the document declares
# (status code, content type and body shape).
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)


@dataclass(frozen=True)
class Failure:
    operation: str
    check: str
    title: str
    message: str
    reproduce: str

    def __str__(self) -> str:
        return f"{self.operation} [{self.check}] {self.title}: {self.message}\n    {self.reproduce}"


@dataclass
class CampaignResult:
    operations: int = 0
    cases: int = 0
    failures: list[Failure] = field(default_factory=list)
    # Engine errors (a case that could not be generated or sent), not API failures.
    errors: list[str] = field(default_factory=list)
    # Seconds spent per operation, all phases together.
    seconds: dict[str, float] = field(default_factory=dict)


def run_campaign(
    base_url: str,
    *,
    headers: Mapping[str, str],
    max_examples: int,
    seed: int = 5,
    checks: Sequence[str] = CHECKS,
    request_timeout_s: float = 5.0,
    phases: Sequence[str] = ("examples", "coverage", "fuzzing"),
) -> CampaignResult:
    """Run schemathesis over ``{base_url}/docs/openapi.json`` and count cases and failures."""
    config = SchemathesisConfig.from_dict(
        {
            "base-url": base_url,
            "headers": dict(headers),
            "seed": seed,
            # Above the 3 s a cancel waits for its job to end.
            "request-timeout": request_timeout_s,
            # An event stream is read up to its first event or until its timeout; a quiet one (the
            # gallery's) would otherwise cost the full request timeout each case.
            "max-stream-events": 1,
            "operations": [{"include-path-regex": "^/api/sse/", "request-timeout": 1.0}],
            "workers": 1,
            "generation": {"max-examples": max_examples, "mode": "all", "database": "none"},
            "checks": {"enabled": False, **{name: {"enabled": True} for name in checks}},
            "phases": {name: {"enabled": name in phases} for name in ("examples", "coverage", "fuzzing", "stateful")},
        }
    )
    schema = schemathesis.openapi.from_url(f"{base_url}/docs/openapi.json", config=config)
    result = CampaignResult()
    labels: set[str] = set()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished) and event.is_test_scenario:
            if event.label:
                labels.add(event.label)
                result.seconds[event.label] = result.seconds.get(event.label, 0.0) + event.elapsed_time
            _record(result, event)
        elif isinstance(event, events.NonFatalError):
            result.errors.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            result.errors.append(f"fatal: {event.exception!r}")
    result.operations = len(labels)
    return result


def _record(result: CampaignResult, event: events.ScenarioFinished) -> None:
    recorder = event.recorder
    result.cases += len(recorder.cases)
    seen = {(f.operation, f.check, f.title, f.message) for f in result.failures}
    for case_id, node in recorder.cases.items():
        for check in recorder.checks.get(case_id, []):
            if check.status is not Status.FAILURE or check.failure_info is None:
                continue
            failure = check.failure_info.failure
            found = Failure(
                operation=node.value.operation.label,
                check=check.name,
                title=failure.title,
                message=failure.message,
                reproduce=check.failure_info.code_sample,
            )
            if (found.operation, found.check, found.title, found.message) not in seen:
                seen.add((found.operation, found.check, found.title, found.message))
                result.failures.append(found)
