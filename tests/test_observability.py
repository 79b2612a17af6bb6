"""Metrics and traces of real role processes (issue 6): ``imagebus ingress``, ``worker --backend
remote`` (against the fake image API) and ``projector``, each its own process on NATS, as they
run in a cluster. After a job, each role's ``/metrics`` counts it with its backend and model, and
the job's log lines in all three processes carry one trace id (no exporter is set, so the ingress
makes no SDK span per request: a test below holds that its trace still reaches logs and bus
headers)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar, get
from litestar.testing import AsyncTestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from bus import BusOptions, LoggedEvent, connect_bus
from bus.tracing import attached, trace_context, trace_headers
from imagebus.catalog import load_catalog
from imagebus.logging import add_trace_id
from imagebus.process import ManagedProcess, free_port
from ingress.telemetry import RequestTelemetry
from schemas import Catalog, ImageStored, JobStarted, JobSucceeded, ModelSpec, RemoteEndpoint
from storage.object_store import ObjectStore, S3Config
from tests.chaos_rig import NatsBroker, role_env, start_role, wait_logged
from tests.fakes.image_api import FakeImageApi
from tests.stack import running_stack
from tests.test_worker_runtime import ScriptedBackend, _command
from workers.backends.base import Backend, GeneratedImage, JobRequest
from workers.runtime import Worker, WorkerOptions

TOKEN = "sk-observed"
API_KEY = "ib_test_observer_" + uuid.uuid4().hex
MODEL = "fake-dalle"
# A caller's own trace: W3C traceparent of version 00, sampled.
CALLER_TRACE_ID = uuid.uuid4().hex
CALLER_TRACEPARENT = f"00-{CALLER_TRACE_ID}-{uuid.uuid4().hex[:16]}-01"


def _catalog(api: FakeImageApi) -> Catalog:
    shipped = load_catalog()
    endpoint = RemoteEndpoint(id="fake-openai", kind="openai", url=api.openai_url, concurrency=2, timeout_s=10)
    model = ModelSpec(id=MODEL, description="fake", backend="remote", source="dall-e-2",
                      endpoint="fake-openai", max_images=1, supports_negative_prompt=False)  # fmt: skip
    return shipped.model_copy(
        update={"models": {**shipped.models, MODEL: model}, "endpoints": {**shipped.endpoints, "fake-openai": endpoint}}
    )


class Roles:
    def __init__(self, processes: dict[str, ManagedProcess], ingress_url: str, metrics_urls: dict[str, str]) -> None:
        self.processes = processes
        self.ingress_url = ingress_url
        self.metrics_urls = metrics_urls

    def log_lines(self, role: str) -> list[dict[str, Any]]:
        lines = []
        for line in self.processes[role].log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
        return lines


@contextmanager
def _stopped_at_exit(processes: dict[str, ManagedProcess]) -> Iterator[None]:
    try:
        yield
    finally:
        for process in processes.values():
            process.stop(grace_s=10)


@asynccontextmanager
async def _roles(nats_url: str, s3: S3Config, tmp_path: Path) -> AsyncIterator[Roles]:
    async with FakeImageApi(tokens=(TOKEN,), latency_s=0.05).running() as api:
        catalog_path = tmp_path / "catalog.json"
        catalog_path.write_text(_catalog(api).model_dump_json())
        env = role_env(
            nats_url,
            BusOptions(namespace=f"obs{uuid.uuid4().hex[:8]}"),
            s3,
            {
                "IMAGEBUS_DATABASE_URL": f"sqlite:///{tmp_path}/rm.db",
                "IMAGEBUS_CATALOG": str(catalog_path),
                "IMAGEBUS_API_KEYS": API_KEY,
                "IMAGEBUS_METRICS_HOST": "127.0.0.1",
            },
        )
        ingress_port = free_port()
        metrics_ports = {"worker": free_port(), "projector": free_port()}
        processes = {
            "ingress": start_role("ingress", ["ingress", "--port", str(ingress_port)], env, tmp_path),
            "worker": start_role(
                "worker",
                ["worker", "--backend", "remote"],
                {
                    **env,
                    "IMAGEBUS_METRICS_PORT": str(metrics_ports["worker"]),
                    "IMAGEBUS_WORKER_REMOTE_TOKENS": json.dumps({"fake-openai": TOKEN}),
                },
                tmp_path,
            ),
            "projector": start_role(
                "projector", ["projector"], {**env, "IMAGEBUS_METRICS_PORT": str(metrics_ports["projector"])}, tmp_path
            ),
        }
        with _stopped_at_exit(processes):
            ready = {"ingress": "ingress_ready", "worker": "worker_ready", "projector": "projector_ready"}
            await asyncio.gather(*(wait_logged(processes[role], event, 60) for role, event in ready.items()))
            ingress_url = f"http://127.0.0.1:{ingress_port}"
            metrics_urls = {role: f"http://127.0.0.1:{port}/metrics" for role, port in metrics_ports.items()}
            metrics_urls["ingress"] = f"{ingress_url}/metrics"
            yield Roles(processes, ingress_url, metrics_urls)


async def _wait_answering(client: httpx.AsyncClient, url: str, timeout_s: float = 30) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await client.get(url)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _completed(client: httpx.AsyncClient, url: str, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        job: dict[str, Any] = (await client.get(f"{url}/api/jobs/{job_id}", headers={"X-API-Key": API_KEY})).json()
        if job["status"] in ("completed", "failed", "canceled") or time.monotonic() > deadline:
            return job
        await asyncio.sleep(0.2)


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def _value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float | None:
    for sample_name, sample_labels, value in samples:
        if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items()):
            return value
    return None


def _trace_ids(lines: list[dict[str, Any]], job_id: str) -> set[str]:
    return {line["trace_id"] for line in lines if line.get("job_id") == job_id and "trace_id" in line}


async def test_a_job_is_counted_by_every_role_and_traced_through_all_three(
    nats_url: str, storage_config: S3Config, tmp_path: Path
) -> None:
    async with _roles(nats_url, storage_config, tmp_path) as roles, httpx.AsyncClient(timeout=10) as client:
        ready = await _wait_answering(client, f"{roles.ingress_url}/ready")
        assert ready.status_code == 200, ready.text
        body = {"model": MODEL, "prompt": "a lighthouse at dusk", "width": 256, "height": 256}
        headers = {"X-API-Key": API_KEY}
        # One job inside the caller's own trace, one that starts a trace at the ingress.
        traced = await client.post(
            f"{roles.ingress_url}/api/generate", json=body, headers={**headers, "traceparent": CALLER_TRACEPARENT}
        )
        untraced = await client.post(f"{roles.ingress_url}/api/generate", json=body, headers=headers)
        assert traced.status_code == untraced.status_code == 202, (traced.text, untraced.text)
        job_ids = [traced.json()["job_id"], untraced.json()["job_id"]]
        jobs = [await _completed(client, roles.ingress_url, job_id) for job_id in job_ids]
        assert [job["status"] for job in jobs] == ["completed", "completed"], jobs

        # The projector writes after the event: give its metric a moment to follow the read model.
        deadline = time.monotonic() + 10
        while True:
            scraped = {role: (await client.get(url)) for role, url in roles.metrics_urls.items()}
            assert all(r.status_code == 200 for r in scraped.values()), scraped
            samples = {role: _samples(r.text) for role, r in scraped.items()}
            projected = _value(
                samples["projector"], "imagebus_jobs_total", status="completed", backend="remote", model=MODEL
            )
            if projected == 2 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)

        # Each role counts the jobs with their backend and model.
        assert projected == 2, samples["projector"]
        assert _value(samples["projector"], "imagebus_jobs_total", status="processing", backend="remote") == 2
        assert _value(samples["ingress"], "imagebus_jobs_submitted_total", backend="remote", model=MODEL) == 2
        generate = {"route": "/api/generate", "method": "POST", "code": "202"}
        assert _value(samples["ingress"], "imagebus_http_requests_total", **generate) == 2
        assert _value(samples["ingress"], "imagebus_queue_depth", backend="remote", queue="remote") is not None
        assert _value(samples["worker"], "imagebus_job_duration_seconds_count", backend="remote", model=MODEL) == 2
        assert _value(samples["worker"], "imagebus_job_queue_seconds_count", backend="remote", model=MODEL) == 2
        slots = _value(samples["worker"], "imagebus_worker_slots", backend="remote")
        assert slots is not None and slots >= 2  # the endpoints' caps added up
        busy = _value(samples["worker"], "imagebus_worker_busy_seconds_total", backend="remote")
        assert busy is not None and busy > 0
        health = await client.get(roles.metrics_urls["worker"].replace("/metrics", "/health"))
        assert health.status_code == 200

    # Logs after the processes stopped: everything they wrote is on disk.
    lines = {role: roles.log_lines(role) for role in ("ingress", "worker", "projector")}
    for job_id, expected in zip(job_ids, [CALLER_TRACE_ID, None], strict=True):
        per_role = {role: _trace_ids(role_lines, job_id) for role, role_lines in lines.items()}
        assert all(len(ids) == 1 for ids in per_role.values()), per_role
        trace_ids = set.union(*per_role.values())
        assert len(trace_ids) == 1, per_role  # one trace through ingress, worker and projector
        if expected is not None:
            assert trace_ids == {expected}  # the caller's trace, continued
    assert len({next(iter(_trace_ids(lines["ingress"], job_id))) for job_id in job_ids}) == 2


async def test_ready_answers_503_while_the_bus_is_down_and_200_once_it_is_back(
    storage_config: S3Config, tiny_backend: Backend, tmp_path: Path
) -> None:
    broker = NatsBroker(tmp_path / "nats").start()
    try:
        async with running_stack(
            broker.url, storage_config, f"sqlite:///{tmp_path}/rm.db", tiny_backend, workers=0
        ) as stack:
            assert (await stack.client.get("/ready")).status_code == 200
            broker.down(crash=True)
            down = await stack.client.get("/ready")
            assert down.status_code == 503, down.text
            assert down.json()["status"] == "error" and "message bus" in down.json()["message"]
            assert (await stack.client.get("/health")).status_code == 200  # alive all the same
            broker.start()
            deadline = time.monotonic() + 20
            while (await stack.client.get("/ready")).status_code != 200:
                assert time.monotonic() < deadline, "not ready again after the bus came back"
                await asyncio.sleep(0.2)
    finally:
        broker.close()


@pytest.fixture
def recorded_spans() -> Iterator[InMemorySpanExporter]:
    """Every SDK span ended while the test runs (an SDK provider installed if none is yet)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()  # the processor stays with the provider; a shut exporter keeps nothing


def _seen_app(*, spans: bool) -> Litestar:
    @get("/seen", sync_to_thread=False)
    def seen() -> dict[str, Any]:
        # What a log line (imagebus.logging) and a publish (every bus adapter) take of the request.
        return {"log": add_trace_id(None, "seen", {}), "headers": trace_headers()}

    return Litestar(route_handlers=[seen], middleware=[RequestTelemetry(spans=spans)])


async def test_without_an_exporter_a_request_has_no_sdk_span_yet_its_trace_reaches_logs_and_bus_headers(
    recorded_spans: InMemorySpanExporter,
) -> None:
    parent_span_id = CALLER_TRACEPARENT.split("-")[2]
    async with AsyncTestClient(_seen_app(spans=False)) as client:
        traced = (await client.get("/seen", headers={"traceparent": CALLER_TRACEPARENT})).json()
        untraced = [(await client.get("/seen")).json() for _ in range(2)]
    assert recorded_spans.get_finished_spans() == ()

    # The caller's trace continued, under a span id of the ingress's own.
    assert traced["log"] == {"trace_id": CALLER_TRACE_ID}
    version, trace_id, span_id, flags = traced["headers"]["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", CALLER_TRACE_ID, "01")
    assert span_id != parent_span_id and int(span_id, 16) != 0
    # Else a new sampled trace per request, the same in its log lines and its bus headers.
    for seen in untraced:
        _, trace_id, _, flags = seen["headers"]["traceparent"].split("-")
        assert seen["log"] == {"trace_id": trace_id} and flags == "01" and int(trace_id, 16) != 0
    assert untraced[0]["log"] != untraced[1]["log"]

    # With an exporter, the same request is an SDK span in the same trace.
    async with AsyncTestClient(_seen_app(spans=True)) as client:
        exported = (await client.get("/seen", headers={"traceparent": CALLER_TRACEPARENT})).json()
    [span] = recorded_spans.get_finished_spans()
    assert span.name == "GET /seen" and format(span.context.trace_id, "032x") == CALLER_TRACE_ID
    assert exported["headers"]["traceparent"].split("-")[2] == format(span.context.span_id, "016x")
    assert span.attributes is not None and span.attributes["http.response.status_code"] == 200


class _SeeingBackend(ScriptedBackend):
    """Notes what a log line takes of the job's trace while the job runs (on its thread)."""

    def __init__(self) -> None:
        super().__init__(steps=1)
        self.logged: list[Mapping[str, Any]] = []

    async def generate(self, job: JobRequest) -> list[GeneratedImage]:
        self.logged.append(add_trace_id(None, "generating", {}))
        return await super().generate(job)


async def _worker_run(object_store: ObjectStore, *, spans: bool) -> tuple[_SeeingBackend, list[LoggedEvent]]:
    bus = await connect_bus(f"memory://{uuid.uuid4().hex}", BusOptions(namespace=f"t{uuid.uuid4().hex[:10]}"))
    try:
        command = _command()
        with attached(trace_context({"traceparent": CALLER_TRACEPARENT})):  # as the ingress publishes it
            await bus.publish_command(command)
        backend = _SeeingBackend()
        await Worker(bus, object_store, backend, WorkerOptions(worker_id="w", spans=spans)).run(idle_timeout_s=0.5)
        async with bus.read_events(idle_timeout_s=0.3) as events:
            return backend, [logged async for logged in events if logged.event.job_id == command.job_id]
    finally:
        await bus.close()


async def test_without_an_exporter_a_job_has_no_worker_sdk_span_yet_its_trace_reaches_logs_and_events(
    recorded_spans: InMemorySpanExporter, object_store: ObjectStore
) -> None:
    backend, events = await _worker_run(object_store, spans=False)
    assert [span.name for span in recorded_spans.get_finished_spans()] == []
    assert backend.logged == [{"trace_id": CALLER_TRACE_ID}]
    assert [type(logged.event) for logged in events] == [JobStarted, ImageStored, JobSucceeded]
    for logged in events:
        assert logged.trace_headers["traceparent"].split("-")[1] == CALLER_TRACE_ID

    # With an exporter, the job is one worker span in the same trace, its events published in it.
    backend, events = await _worker_run(object_store, spans=True)
    [span] = recorded_spans.get_finished_spans()
    assert span.name == "generate scripted" and format(span.context.trace_id, "032x") == CALLER_TRACE_ID
    assert backend.logged == [{"trace_id": CALLER_TRACE_ID}]
    span_id = format(span.context.span_id, "016x")
    assert all(logged.trace_headers["traceparent"].split("-")[2] == span_id for logged in events)
