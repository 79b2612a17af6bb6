"""The remote backend against a local fake of the OpenAI Images API and a Chutes image endpoint.

Everything goes over real HTTP to ``tests/fakes/image_api.py``: streaming, retries and their waits,
the per-endpoint cap, cancellation of a request in flight, oversized and non-image answers.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
import structlog
from PIL import Image

from imagebus.process import free_port
from schemas import GenerationParams
from schemas.catalog import Catalog, ModelSpec, RemoteEndpoint
from tests.fakes.image_api import FakeImageApi, Fault
from workers.backends.base import (
    CancelToken,
    GeneratedImage,
    GenerationCanceled,
    JobRequest,
    Progress,
    RetryableError,
)
from workers.backends.remote import ImageTooLarge, NotAnImage, RemoteApiError, RemoteBackend, RetryPolicy
from workers.backends.remote.images_json import ImagesAnswerReader
from workers.backends.remote.quota import quota_from_headers
from workers.backends.remote.retry import retry_after_s
from workers.backends.remote.spool import ImageSpool

TOKEN = "sk-test-token"
# Short backoffs so retry tests take tenths of a second; Retry-After is still honoured as sent.
FAST_RETRIES = RetryPolicy(base_delay_s=0.05, max_delay_s=0.2, max_retry_after_s=10.0, redelivery_delay_s=7.0)

# model id -> (endpoint id, model name sent to the API)
MODELS = {
    "fake-b64": ("openai-b64", "fake-image-1"),
    "fake-url": ("openai-url", "fake-image-1"),
    "gpt-image": ("openai-b64", "gpt-image-1"),
    "dall-e-3": ("openai-b64", "dall-e-3"),
    "qwen": ("chutes", "qwen-image"),
}


def catalog(api: FakeImageApi, *, only: str | None = None, **endpoint: Any) -> Catalog:
    """The test models over endpoints at ``api``; ``only`` keeps one endpoint (and its models)."""
    endpoints = {
        "openai-b64": RemoteEndpoint(id="openai-b64", kind="openai", url=api.openai_url, **endpoint),
        "openai-url": RemoteEndpoint(
            id="openai-url", kind="openai", url=api.openai_url, response_format="url", **endpoint
        ),
        "chutes": RemoteEndpoint(id="chutes", kind="chutes", url=api.chutes_url, **endpoint),
    }
    if only is not None:
        endpoints = {only: endpoints[only]}
    models = {
        model_id: ModelSpec(id=model_id, description=model_id, backend="remote", source=source, endpoint=endpoint_id)
        for model_id, (endpoint_id, source) in MODELS.items()
        if endpoint_id in endpoints
    }
    return Catalog(default=next(iter(models)), models=models, endpoints=endpoints)


def params(model: str, **overrides: Any) -> GenerationParams:
    fields: dict[str, Any] = {
        "prompt": "a red fox in snow",
        "model": model,
        "width": 64,
        "height": 48,
        "num_inference_steps": 20,
        "guidance_scale": 7.5,
        "num_images": 1,
    }
    fields.update(overrides)
    return GenerationParams(**fields)


class Job:
    """A JobRequest plus what it reported."""

    def __init__(self, generation: GenerationParams) -> None:
        self.progress: list[Progress] = []
        self.request = JobRequest(job_id="job-1", params=generation, on_progress=self.progress.append)

    @property
    def cancel(self) -> CancelToken:
        return self.request.cancel


@pytest.fixture(scope="module")
async def served_api() -> AsyncIterator[FakeImageApi]:
    # Odd-sized pieces, so answers reach the backend split at awkward places.
    async with FakeImageApi(chunk_bytes=997).running() as served:
        yield served


@pytest.fixture
def api(served_api: FakeImageApi) -> FakeImageApi:
    served_api.reset()
    return served_api


@pytest.fixture
async def make_backend() -> AsyncIterator[Callable[..., RemoteBackend]]:
    made: list[RemoteBackend] = []

    def make(
        catalog: Catalog, tokens: dict[str, str] | None = None, *, policy: RetryPolicy = FAST_RETRIES, **options: Any
    ) -> RemoteBackend:
        all_tokens = {endpoint_id: TOKEN for endpoint_id in catalog.endpoints}
        backend = RemoteBackend(catalog, all_tokens if tokens is None else tokens, retry_policy=policy, **options)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.close()


def decoded(image: GeneratedImage) -> Image.Image:
    opened = Image.open(io.BytesIO(image.read_all()))
    opened.load()
    return opened


async def generate(backend: RemoteBackend, generation: GenerationParams) -> list[GeneratedImage]:
    return await backend.generate(Job(generation).request)


# --- OpenAI Images API ---------------------------------------------------------------------------


async def test_openai_b64_images_arrive_decoded_with_their_size_and_progress(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend]
) -> None:
    api.escape_slashes = True  # "\/" inside b64_json, as some servers write it
    backend = make_backend(catalog(api))
    job = Job(params("fake-b64", num_images=3))

    images = await backend.generate(job.request)

    assert [(image.width, image.height, image.content_type, image.seed) for image in images] == [
        (64, 48, "image/png", None)
    ] * 3
    for image in images:
        assert decoded(image).size == (64, 48)
        assert image.length == len(image.read_all())
    assert [(p.step, p.total_steps) for p in job.progress] == [(1, 3), (2, 3), (3, 3)]
    (sent,) = api.generation_requests()
    assert sent.body == {
        "model": "fake-image-1",
        "prompt": "a red fox in snow",
        "n": 3,
        "size": "64x48",
        "response_format": "b64_json",
    }
    assert sent.headers["authorization"] == f"Bearer {TOKEN}"


async def test_pixels_depend_on_the_prompt(api: FakeImageApi, make_backend: Callable[..., RemoteBackend]) -> None:
    backend = make_backend(catalog(api))
    first = (await generate(backend, params("fake-b64")))[0].read_all()
    again = (await generate(backend, params("fake-b64")))[0].read_all()
    other = (await generate(backend, params("fake-b64", prompt="a blue whale")))[0].read_all()
    assert first == again
    assert first != other


async def test_openai_url_images_are_downloaded_without_the_token(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend]
) -> None:
    backend = make_backend(catalog(api))
    images = await generate(backend, params("fake-url", num_images=2))

    assert [decoded(image).size for image in images] == [(64, 48), (64, 48)]
    (sent,) = api.generation_requests()
    assert sent.body["response_format"] == "url"
    downloads = [r for r in api.requests if r.method == "GET"]
    assert len(downloads) == 2
    # The image URL is another host's in real life (a CDN): our key must never travel there.
    assert all("authorization" not in r.headers for r in downloads)


async def test_a_failed_download_is_retried(api: FakeImageApi, make_backend: Callable[..., RemoteBackend]) -> None:
    backend = make_backend(catalog(api))
    api.script_downloads(Fault.server_error(500))
    images = await generate(backend, params("fake-url"))
    assert decoded(images[0]).size == (64, 48)
    assert len(api.generation_requests()) == 1  # the image was not generated (and paid for) twice
    assert len([r for r in api.requests if r.method == "GET"]) == 2


async def test_gpt_image_models_get_no_response_format(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend]
) -> None:
    # The real API refuses the parameter for gpt-image-* ("Unknown parameter"); so does the fake.
    backend = make_backend(catalog(api))
    images = await generate(backend, params("gpt-image", width=1024, height=1024))
    assert decoded(images[0]).size == (1024, 1024)
    assert "response_format" not in api.generation_requests()[0].body


async def test_openai_refusal_fails_at_once_with_the_api_message(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend]
) -> None:
    backend = make_backend(catalog(api))
    with pytest.raises(RemoteApiError) as refused:
        await generate(backend, params("fake-b64", prompt="something forbidden"))
    message = str(refused.value)
    assert "openai-b64 answered HTTP 400" in message
    assert "rejected as a result of our safety system" in message
    assert "content_policy_violation" in message
    assert len(api.generation_requests()) == 1  # a 400 is not retried

    with pytest.raises(RemoteApiError, match=r"Invalid 'n'.*Expected a value <= 1, but got 2"):
        await generate(backend, params("dall-e-3", width=1024, height=1024, num_images=2))


async def test_openai_answer_that_is_not_json_fails_clearly(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend]
) -> None:
    backend = make_backend(catalog(api))
    api.script(Fault.not_an_image())
    with pytest.raises(RemoteApiError, match="not JSON"):
        await generate(backend, params("fake-b64"))


# --- Chutes --------------------------------------------------------------------------------------


async def test_chutes_sends_one_request_per_image_with_the_seed_proxy_body(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend]
) -> None:
    backend = make_backend(catalog(api))
    job = Job(params("qwen", num_images=3, seed=41, negative_prompt="blur"))

    images = await backend.generate(job.request)

    assert [(image.seed, image.content_type, image.width, image.height) for image in images] == [
        (41, "image/jpeg", 64, 48),
        (42, "image/jpeg", 64, 48),
        (43, "image/jpeg", 64, 48),
    ]
    bodies = sorted((r.body for r in api.generation_requests()), key=lambda body: body["seed"])
    assert bodies == [
        {
            "model": "qwen-image",
            "prompt": "a red fox in snow",
            "negative_prompt": "blur",
            "guidance_scale": 7.5,
            "width": 64,
            "height": 48,
            "num_inference_steps": 20,
            "seed": seed,
        }
        for seed in (41, 42, 43)
    ]
    assert [(p.step, p.total_steps) for p in job.progress] == [(1, 3), (2, 3), (3, 3)]


async def test_chutes_same_seed_same_image_and_chosen_seeds_are_recorded(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend]
) -> None:
    backend = make_backend(catalog(api))
    first = await generate(backend, params("qwen", seed=7))
    again = await generate(backend, params("qwen", seed=7))
    assert first[0].read_all() == again[0].read_all()

    unseeded = await generate(backend, params("qwen", num_images=2))
    seeds = [image.seed for image in unseeded]
    assert seeds[0] is not None and seeds[1] == (seeds[0] + 1) % 2**32
    assert {r.body["seed"] for r in api.generation_requests()[-2:]} == set(seeds)


async def test_chutes_validation_error_is_reported_in_our_words(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend]
) -> None:
    backend = make_backend(catalog(api))
    with pytest.raises(RemoteApiError, match=r"chutes answered HTTP 422: prompt: Field required"):
        await generate(backend, params("qwen", prompt=""))


async def test_non_image_answer_fails_the_job_clearly(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend]
) -> None:
    backend = make_backend(catalog(api))
    api.script(Fault.not_an_image())
    with pytest.raises(NotAnImage) as failed:
        await generate(backend, params("qwen"))
    message = str(failed.value)
    assert "not an image" in message
    assert "text/html" in message
    assert "Service temporarily unavailable" in message
    assert len(api.generation_requests()) == 1


@pytest.mark.parametrize("declare_length", [False, True])
async def test_oversized_image_is_aborted_as_soon_as_the_cap_passes(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend], declare_length: bool
) -> None:
    cap = 256 * 1024
    backend = make_backend(catalog(api, max_image_bytes=cap))
    endless = 256 * 1024 * 1024
    api.script(Fault.oversized(endless, declare_length=declare_length))

    started = time.monotonic()
    with pytest.raises(ImageTooLarge, match=r"max_image_bytes \(262144 bytes\).*download aborted"):
        await generate(backend, params("qwen"))

    assert time.monotonic() - started < 5
    await wait_for(lambda: api.aborted == 1)
    # Only what the socket buffers held went out: nowhere near the whole body.
    assert api.endless_sent < endless // 8


async def test_oversized_b64_answer_is_aborted(api: FakeImageApi, make_backend: Callable[..., RemoteBackend]) -> None:
    backend = make_backend(catalog(api, max_image_bytes=128 * 1024))
    api.script(Fault.oversized(256 * 1024 * 1024))
    with pytest.raises(RemoteApiError, match="max_image_bytes"):
        await generate(backend, params("fake-b64"))
    await wait_for(lambda: api.aborted == 1)
    assert api.endless_sent < 32 * 1024 * 1024


async def test_images_past_the_spool_size_go_to_disk(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend]
) -> None:
    small_spool = make_backend(catalog(api), spool_max_memory=1024)
    default_spool = make_backend(catalog(api))
    for model in ("fake-b64", "fake-url", "qwen"):
        (spilled,) = await generate(small_spool, params(model, seed=3))
        (kept,) = await generate(default_spool, params(model, seed=3))
        assert spilled.length > 1024
        # SpooledTemporaryFile's own flag: rolled over to a real file on disk.
        assert spilled.content._rolled  # type: ignore[attr-defined]
        assert not kept.content._rolled  # type: ignore[attr-defined]
        assert spilled.read_all() == kept.read_all()


# --- retries -------------------------------------------------------------------------------------


async def test_429_then_success_waits_as_retry_after_says(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend]
) -> None:
    backend = make_backend(catalog(api))
    api.script(Fault.rate_limited(retry_after="1"))

    images = await generate(backend, params("fake-b64"))

    assert decoded(images[0]).size == (64, 48)
    first, second = api.generation_requests()
    waited = second.received_at - first.received_at
    assert 1.0 <= waited < 1.5, waited


async def test_retry_after_as_an_http_date_is_honoured(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend]
) -> None:
    backend = make_backend(catalog(api))
    # HTTP dates have whole seconds: "2 s from now" is between 1 and 2 s away.
    api.script(Fault.rate_limited(retry_after=format_datetime(datetime.now(UTC) + timedelta(seconds=2), usegmt=True)))

    await generate(backend, params("qwen"))

    first, second = api.generation_requests()
    assert 0.95 <= second.received_at - first.received_at < 2.5


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_error_then_success(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend], status: int
) -> None:
    backend = make_backend(catalog(api))
    api.script(Fault.server_error(status))
    images = await generate(backend, params("fake-b64"))
    assert decoded(images[0]).size == (64, 48)
    assert len(api.generation_requests()) == 2


async def test_exhausted_retries_raise_retryable_error(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend]
) -> None:
    backend = make_backend(catalog(api, max_retries=2))
    api.script(*[Fault.server_error(503)] * 3)

    with pytest.raises(RetryableError) as gave_up:
        await generate(backend, params("fake-b64"))

    assert "openai-b64 answered HTTP 503: The engine is currently overloaded" in str(gave_up.value)
    assert "gave up after 3 tries" in str(gave_up.value)
    assert gave_up.value.delay_s == FAST_RETRIES.redelivery_delay_s
    assert len(api.generation_requests()) == 3


async def test_a_long_retry_after_hands_the_job_back_at_once(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend]
) -> None:
    backend = make_backend(catalog(api))
    api.script(Fault.rate_limited(retry_after="3600"))
    started = time.monotonic()
    with pytest.raises(RetryableError) as handed_back:
        await generate(backend, params("qwen"))
    assert time.monotonic() - started < 1
    assert handed_back.value.delay_s == FAST_RETRIES.max_redelivery_delay_s
    assert len(api.generation_requests()) == 1


async def test_connection_errors_are_retried_then_handed_back(make_backend: Callable[..., RemoteBackend]) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    endpoints = {"down": RemoteEndpoint(id="down", kind="chutes", url=f"{nobody}/generate", max_retries=2)}
    models = {"m": ModelSpec(id="m", description="m", backend="remote", source="qwen-image", endpoint="down")}
    backend = make_backend(Catalog(default="m", models=models, endpoints=endpoints))
    with pytest.raises(RetryableError, match=r"down: connection failed .*gave up after 3 tries"):
        await generate(backend, params("m"))


async def test_a_slow_answer_times_out_and_is_retried(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend]
) -> None:
    backend = make_backend(catalog(api, timeout_s=0.3))
    api.script(Fault.slow(5))
    started = time.monotonic()
    images = await generate(backend, params("qwen"))
    assert decoded(images[0]).size == (64, 48)
    assert time.monotonic() - started < 2
    assert len(api.generation_requests()) == 2
    await wait_for(lambda: api.aborted == 1)


# --- concurrency cap -----------------------------------------------------------------------------


async def test_the_cap_is_never_exceeded_with_three_times_more_jobs(
    make_backend: Callable[..., RemoteBackend],
) -> None:
    async with FakeImageApi(latency_s=0.2).running() as api:
        backend = make_backend(catalog(api, only="openai-b64", concurrency=2))
        assert backend.concurrency == 2  # the runtime gives it as many jobs as the caps allow
        started = time.monotonic()
        results = await asyncio.gather(*(generate(backend, params("fake-b64")) for _ in range(6)))
        elapsed = time.monotonic() - started

    assert len(results) == 6
    assert api.max_in_flight == 2
    assert elapsed >= 3 * 0.2  # six requests, two at a time


async def test_the_cap_holds_across_the_images_of_chutes_jobs(make_backend: Callable[..., RemoteBackend]) -> None:
    async with FakeImageApi(latency_s=0.1).running() as api:
        backend = make_backend(catalog(api, only="chutes", concurrency=3))
        results = await asyncio.gather(*(generate(backend, params("qwen", num_images=3)) for _ in range(3)))
    assert [len(images) for images in results] == [3, 3, 3]
    assert len(api.generation_requests()) == 9
    assert api.max_in_flight == 3


async def test_concurrency_is_the_sum_of_the_caps_unless_given(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend]
) -> None:
    assert make_backend(catalog(api, concurrency=4)).concurrency == 12
    assert make_backend(catalog(api, concurrency=4), concurrency=5).concurrency == 5


# --- cancellation --------------------------------------------------------------------------------


async def test_cancel_aborts_the_request_in_flight(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend]
) -> None:
    backend = make_backend(catalog(api))
    api.script(Fault.slow(30))
    job = Job(params("qwen"))
    task = asyncio.create_task(backend.generate(job.request))
    await wait_for(lambda: api.in_flight == 1)

    # The runtime cancels from its control loop; any thread must do.
    canceller = threading.Thread(target=job.cancel.cancel, args=("canceled by request",))
    started = time.monotonic()
    canceller.start()
    with pytest.raises(GenerationCanceled, match="canceled by request"):
        await task
    canceller.join()

    assert time.monotonic() - started < 1
    await wait_for(lambda: api.aborted == 1)  # the fake saw the connection go
    assert api.in_flight == 0


async def test_cancel_during_a_retry_wait(api: FakeImageApi, make_backend: Callable[..., RemoteBackend]) -> None:
    backend = make_backend(catalog(api))
    api.script(Fault.rate_limited(retry_after="5"))
    job = Job(params("fake-b64"))
    task = asyncio.create_task(backend.generate(job.request))
    await wait_for(lambda: len(api.generation_requests()) == 1)
    await asyncio.sleep(0.1)
    job.cancel.cancel("worker shutting down")
    with pytest.raises(GenerationCanceled):
        await task
    assert len(api.generation_requests()) == 1


async def test_a_job_canceled_before_it_starts_sends_nothing(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend]
) -> None:
    backend = make_backend(catalog(api))
    job = Job(params("qwen"))
    job.cancel.cancel("canceled early")
    with pytest.raises(GenerationCanceled):
        await backend.generate(job.request)
    assert api.generation_requests() == []


# --- tokens --------------------------------------------------------------------------------------


async def test_the_token_is_sent_and_never_logged(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend], caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-live-0123456789abcdef"
    api.tokens = {secret}
    backend = make_backend(catalog(api), {"openai-b64": secret, "chutes": secret, "openai-url": "sk-wrong-987654321"})
    caplog.set_level(logging.DEBUG)  # httpx and httpcore log every request at DEBUG
    with structlog.testing.capture_logs() as events:
        await generate(backend, params("fake-b64"))
        api.script(Fault.server_error())
        await generate(backend, params("qwen"))
        with pytest.raises(RemoteApiError) as refused:
            await generate(backend, params("fake-url"))

    assert {r.headers["authorization"] for r in api.generation_requests()} == {
        f"Bearer {secret}",
        "Bearer sk-wrong-987654321",
    }
    assert "openai-url answered HTTP 401: Incorrect API key provided" in str(refused.value)
    logged = json.dumps(events, default=str) + caplog.text
    assert events, "the backend logs its requests"
    for token in (secret, "sk-wrong-987654321"):
        assert token not in logged
        assert token not in str(refused.value)


async def test_an_echoed_token_is_redacted_from_the_error(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend]
) -> None:
    backend = make_backend(catalog(api))
    api.script(Fault.bad_request(f"key {TOKEN} may not use this model"))
    with pytest.raises(RemoteApiError) as refused:
        await generate(backend, params("fake-b64"))
    assert TOKEN not in str(refused.value)
    assert "key [redacted] may not use this model" in str(refused.value)


async def test_no_token_sends_no_authorization_header(make_backend: Callable[..., RemoteBackend]) -> None:
    async with FakeImageApi(tokens=()).running() as api:
        backend = make_backend(catalog(api), {})
        await generate(backend, params("qwen"))
        await generate(backend, params("fake-b64"))
    assert all("authorization" not in r.headers for r in api.requests)


async def test_a_missing_token_is_refused_as_the_api_says(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend]
) -> None:
    backend = make_backend(catalog(api), {})
    with pytest.raises(RemoteApiError, match="HTTP 401: You didn't provide an API key"):
        await generate(backend, params("fake-b64"))


async def test_an_endpoint_that_needs_a_token_fails_at_once_without_one(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend]
) -> None:
    keyed = catalog(api)
    endpoints = {key: value.model_copy(update={"token_required": True}) for key, value in keyed.endpoints.items()}
    backend = make_backend(keyed.model_copy(update={"endpoints": endpoints}), {})
    with pytest.raises(RemoteApiError, match="needs an API token and this worker has none: set IMAGEBUS_WORKER_REMOTE"):
        await generate(backend, params("fake-b64"))
    assert api.generation_requests() == []


# --- the rest of the protocol --------------------------------------------------------------------


async def test_site_quota_comes_from_rate_limit_headers(
    api: FakeImageApi, make_backend: Callable[..., RemoteBackend]
) -> None:
    backend = make_backend(catalog(api))
    assert await backend.site_quota() is None
    await generate(backend, params("fake-b64"))
    quota = await backend.site_quota()
    assert quota is not None
    assert (quota.source, quota.limit, quota.remaining, quota.used) == ("openai-b64 (requests)", 500, 499, 1)
    assert quota.resets_at is not None


async def test_protocol_surface(api: FakeImageApi, make_backend: Callable[..., RemoteBackend]) -> None:
    backend = make_backend(catalog(api))
    assert (backend.name, backend.max_batch_images) == ("remote", 1)
    assert backend.batch_key(params("qwen")) is None
    with pytest.raises(NotImplementedError):
        await backend.generate_batch([Job(params("qwen")).request])
    await backend.prepare("qwen")
    with pytest.raises(RemoteApiError, match="'nope' is not in the catalog"):
        await backend.prepare("nope")


async def test_a_model_of_another_backend_is_refused(make_backend: Callable[..., RemoteBackend]) -> None:
    models = {"tiny": ModelSpec(id="tiny", description="tiny", source="builtin:tiny-sd")}
    backend = make_backend(Catalog(default="tiny", models=models))
    with pytest.raises(RemoteApiError, match="served by the 'diffusers' backend"):
        await generate(backend, params("tiny"))


# --- the answer reader and header parsing, piece by piece -----------------------------------------


def small_png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (3, 2), color).save(buffer, "PNG")
    return buffer.getvalue()


def read_answer(body: bytes, piece: int) -> list[ImageSpool | str]:
    reader = ImagesAnswerReader(lambda: ImageSpool(max_bytes=1 << 20, max_memory=1 << 10, source="test"), "test")
    for start in range(0, len(body), piece):
        reader.feed(body[start : start + piece])
    return reader.finish()


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 4096])
def test_answer_reader_handles_any_split(piece: int) -> None:
    pngs = [small_png((255, 0, 0)), small_png((0, 0, 255))]
    answer = {
        "created": 1,
        "data": [
            {"revised_prompt": 'a "fox" \u00e9 \\ done', "b64_json": base64.b64encode(pngs[0]).decode()},
            {"b64_json": base64.b64encode(pngs[1]).decode(), "nested": {"url": "not this one", "list": [1, "x"]}},
            {"url": "https://cdn.example/a\u00e9.png"},
        ],
        "usage": {"url": "nor this one"},
    }
    body = json.dumps(answer).replace("/", "\\/").encode()
    outputs = read_answer(body, piece)
    assert len(outputs) == 3
    first, second, url = outputs
    assert isinstance(first, ImageSpool) and isinstance(second, ImageSpool)
    assert [spool.finish(None).read_all() for spool in (first, second)] == pngs
    assert url == "https://cdn.example/a\u00e9.png"


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (b'{"data": [{"b64_json": "iVBORw0K', "ended before"),
        (b"<html>busy</html>", "not JSON"),
        (b'{"data": [{"b64_json": "!!!!"}]}', "not valid base64"),
        (b'{"data": []}', "holds no images"),
        (b'{"data": [{"b64_json": "AAAA\\tAAAA"}]}', "unexpected escape"),
    ],
)
def test_answer_reader_refuses_broken_answers(body: bytes, complaint: str) -> None:
    with pytest.raises(RemoteApiError, match=complaint):
        read_answer(body, 5)


def test_retry_after_forms() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after_s({"retry-after": "3"}, now) == 3.0
    assert retry_after_s({"retry-after": "0.5"}, now) == 0.5
    assert retry_after_s({"retry-after": "Wed, 01 Jan 2025 12:00:20 GMT"}, now) == 20.0
    assert retry_after_s({"retry-after": "Wed, 01 Jan 2025 11:00:00 GMT"}, now) == 0.0
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}, now) == 0.25
    assert retry_after_s({"retry-after": "soon"}, now) is None
    assert retry_after_s({}, now) is None


def test_quota_headers() -> None:
    now = datetime(2025, 1, 1, tzinfo=UTC)
    openai = quota_from_headers(
        "openai",
        {
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-remaining-requests": "59",
            "x-ratelimit-reset-requests": "6m0s",
        },
        now,
    )
    assert openai is not None
    assert (openai.limit, openai.remaining, openai.used) == (60, 59, 1)
    assert openai.resets_at == now + timedelta(minutes=6)
    plain = quota_from_headers("api", {"x-ratelimit-remaining": "5", "x-ratelimit-reset": "1735693200"}, now)
    assert plain is not None
    assert (plain.limit, plain.remaining, plain.used) == (None, 5, None)
    assert plain.resets_at == datetime(2025, 1, 1, 1, 0, tzinfo=UTC)
    assert quota_from_headers("api", {"content-type": "image/png"}, now) is None


async def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 (the fake's counters have no event to wait on)
            await asyncio.sleep(0.01)
