"""Dynamic batching and the model cache, on the built-in tiny pipelines (CPU unless a GPU is there).

1. Throughput: N jobs published at once, run by one Worker (memory bus, SeaweedFS S3) with dynamic
   batching off (max_batch_images=1) and on (4, 8); timed from the first publish to the last
   JobSucceeded. Each job is one image; every job still gets its own events and image.
2. Model switches: jobs alternating between two models, with a cache that holds one model (every
   job reloads, as CyberImage does) and one that holds both; mean seconds per job and loads.

    .venv/bin/python bench/diffusers_batching.py [--jobs 32] [--size 64] [--steps 4] [--model tiny-sd]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import structlog
from worker_runs import bench_store, seconds_through_worker

from imagebus.catalog import load_catalog
from schemas import GenerationParams
from storage.object_store import ObjectStore
from workers.backends.base import JobRequest
from workers.backends.diffusers import DiffusersBackend, DiffusersOptions


def params(model: str, size: int, steps: int, seed: int) -> GenerationParams:
    return GenerationParams(prompt=f"a lighthouse, variation {seed}", model=model, width=size, height=size,
                            num_inference_steps=steps, guidance_scale=5.0, seed=seed)  # fmt: skip


async def throughput(store: ObjectStore, args: argparse.Namespace, max_batch: int) -> float:
    """Images per second for ``args.jobs`` one-image jobs through a Worker."""
    backend = DiffusersBackend(load_catalog(), DiffusersOptions(max_batch_images=max_batch, preview_interval_s=0.5))
    await backend.prepare(args.model)
    jobs = [params(args.model, args.size, args.steps, seed) for seed in range(args.jobs)]
    return args.jobs / await seconds_through_worker(backend, store, jobs)


async def switches(args: argparse.Namespace, models: list[str], max_models: int) -> tuple[float, int]:
    """Mean seconds per job alternating between ``models``, and how many loads that took."""
    backend = DiffusersBackend(load_catalog(), DiffusersOptions(max_loaded_models=max_models))
    seconds = []
    try:
        for index in range(args.switch_jobs):
            model = models[index % len(models)]
            job = JobRequest("bench", params(model, args.size, args.steps, index), lambda _p: None)
            start = time.perf_counter()
            await backend.generate(job)
            seconds.append(time.perf_counter() - start)
        return statistics.mean(seconds[len(models) :]), backend.cache.loads  # first loads are cold either way
    finally:
        await backend.close()


async def main(args: argparse.Namespace) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings and up
    async with bench_store() as store:
        print(f"{args.jobs} one-image jobs, {args.model} {args.size}x{args.size}, {args.steps} steps")
        print()
        print("| max_batch_images | images/s | vs one at a time |")
        print("|---|---|---|")
        await throughput(store, argparse.Namespace(**{**vars(args), "jobs": 4}), 4)  # warm-up
        baseline = None
        for max_batch in (1, 4, 8):
            rate = await throughput(store, args, max_batch)
            baseline = baseline or rate
            print(f"| {max_batch} | {rate:.2f} | {rate / baseline:.2f}x |", flush=True)
        print()
        models = ["tiny-sd", "tiny-sdxl"]
        print(f"{args.switch_jobs} jobs alternating {' / '.join(models)}, {args.size}x{args.size}, {args.steps} steps")
        print()
        print("| model cache | mean s/job | pipeline loads |")
        print("|---|---|---|")
        for label, max_models in (("1 model (reload on every switch)", 1), ("2 models (LRU cache)", 2)):
            mean_s, loads = await switches(args, models, max_models)
            print(f"| {label} | {mean_s:.3f} | {loads} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--switch-jobs", type=int, default=12)
    asyncio.run(main(parser.parse_args()))
