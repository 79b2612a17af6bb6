"""Images/s through the remote backend against the fake image API, at the endpoint's cap vs. one at a time.

The fake (``tests/fakes/image_api.py``) answers every generation request after a fixed latency
(default 200 ms), like a hosted API whose GPU time dominates, so the ideal rate is cap / latency.
Each run gives the backend as many jobs at once as its ``concurrency`` says, as the runtime does.

    backend: jobs handed straight to ``RemoteBackend.generate`` (no bus, no object store)
    worker:  the real worker runtime (``Worker``) on the ``memory://`` bus, images streamed into
             SeaweedFS (``weed mini``), timed from the first publish until the last JobSucceeded

Usage: python bench/remote_throughput.py [--jobs 100] [--cap 10] [--latency-ms 200] [--size 128] [--no-worker]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from worker_runs import bench_store, seconds_through_worker

from schemas import GenerationParams
from schemas.catalog import Catalog, ModelSpec, RemoteEndpoint
from storage.object_store import ObjectStore
from workers.backends.base import JobRequest
from workers.backends.remote import RemoteBackend

if TYPE_CHECKING:
    from tests.fakes.image_api import FakeImageApi

TOKEN = "sk-bench"
# Endpoint kind, its response format, the model name sent.
MODES = {
    "openai b64_json": ("openai", "b64_json", "fake-image-1"),
    "openai url": ("openai", "url", "fake-image-1"),
    "chutes": ("chutes", "b64_json", "qwen-image"),
}


def catalog(api: FakeImageApi, mode: str, cap: int) -> Catalog:
    kind, response_format, source = MODES[mode]
    url = api.openai_url if kind == "openai" else api.chutes_url
    endpoint = RemoteEndpoint(id="bench", kind=kind, url=url, response_format=response_format, concurrency=cap)
    model = ModelSpec(id="bench-model", description="bench", backend="remote", source=source, endpoint="bench")
    return Catalog(default="bench-model", models={"bench-model": model}, endpoints={"bench": endpoint})


def params(size: int) -> GenerationParams:
    return GenerationParams(
        prompt="a lighthouse at dusk", model="bench-model", width=size, height=size, num_inference_steps=20,
        guidance_scale=7.5, seed=1,
    )  # fmt: skip


async def through_backend(api: FakeImageApi, mode: str, cap: int, jobs: int, size: int) -> float:
    backend = RemoteBackend(catalog(api, mode, cap), {"bench": TOKEN})
    slots = asyncio.Semaphore(backend.concurrency)

    async def one(index: int) -> None:
        async with slots:
            images = await backend.generate(JobRequest(job_id=str(index), params=params(size), on_progress=noop))
            for image in images:
                image.content.close()

    try:
        return await timed(lambda: asyncio.gather(*(one(index) for index in range(jobs))))
    finally:
        await backend.close()


async def through_worker(api: FakeImageApi, store: ObjectStore, mode: str, cap: int, jobs: int, size: int) -> float:
    backend = RemoteBackend(catalog(api, mode, cap), {"bench": TOKEN})
    return await seconds_through_worker(backend, store, [params(size)] * jobs)


async def timed(work: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await work()
    return time.perf_counter() - start


def noop(_progress: object) -> None:
    pass


def fake_image_api(latency_s: float) -> FakeImageApi:
    # The fake lives with the tests, which are not an installed package.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.fakes.image_api import FakeImageApi

    return FakeImageApi(tokens=(TOKEN,), latency_s=latency_s)


async def main(args: argparse.Namespace) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings and up
    latency_s = args.latency_ms / 1000
    print(
        f"fake API latency {args.latency_ms} ms per request, {args.size}x{args.size} images, "
        f"{args.jobs} jobs at the cap ({args.cap}), {max(args.jobs // args.cap, 5)} at cap 1"
    )
    print()
    print("| path | API | cap | jobs | seconds | images/s | ideal (cap / latency) | of ideal |")
    print("|---|---|---|---|---|---|---|---|")
    async with fake_image_api(latency_s).running() as api, contextlib.AsyncExitStack() as stack:
        runs: list[tuple[str, Callable[[str, int, int], Awaitable[float]]]] = [
            ("backend", lambda mode, cap, jobs: through_backend(api, mode, cap, jobs, args.size))
        ]
        if args.worker:
            store = await stack.enter_async_context(bench_store())
            runs.append(("worker", lambda mode, cap, jobs: through_worker(api, store, mode, cap, jobs, args.size)))
        for path, run in runs:
            for mode in MODES:
                await run(mode, args.cap, args.cap)  # warm-up: connections, first-call costs
                for cap, jobs in ((args.cap, args.jobs), (1, max(args.jobs // args.cap, 5))):
                    seconds = await run(mode, cap, jobs)
                    rate, ideal = jobs / seconds, cap / latency_s
                    print(
                        f"| {path} | {mode} | {cap} | {jobs} | {seconds:.2f} | {rate:.1f} | {ideal:.1f} "
                        f"| {rate / ideal:.0%} |",
                        flush=True,
                    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--cap", type=int, default=10)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--no-worker", dest="worker", action="store_false", help="skip the runtime + S3 runs")
    asyncio.run(main(parser.parse_args()))
