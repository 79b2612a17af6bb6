"""End-to-end overhead of imagebus over calling the same tiny pipeline directly, and jobs/s.

Runs the real embedded stack (`imagebus up`: NATS, SeaweedFS S3, SQLite, projector, reaper,
worker processes, ingress) and talks to it over HTTP as a client would.

    latency  = submit (POST) until GET /api/jobs/{id} first shows `completed`
    overhead = latency - direct pipeline call (same model, size, steps, one image)

On this 2-core machine a client polling the API every few ms steals a core from the worker
and measures itself, so the bench waits for the job's JobSucceeded on the bus (as an event
subscriber would, no CPU spent meanwhile) and only then polls the API every 1 ms until the
read model shows `completed`. The figure is still "until the API shows it".

The direct call (the pipeline, then its images encoded as the worker stores them: PNG at zlib
level 1) is timed twice: on a quiet machine before the stack starts, and interleaved with the
end-to-end jobs while the stack is up (its idle servers share the 2 cores), which is the baseline
the overhead is computed against.

A lone job on an idle worker starts at once; batches that are not full wait up to
IMAGEBUS_WORKER_BATCH_LINGER_S (50 ms) for batch-mates only while commands arrive in a burst.
--batch-linger-s sets it for the stack (0: never wait).

Usage: python bench/overhead.py [--jobs 40] [--workers 1 2] [--batch-linger-s 0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bus import Bus, BusOptions, connect_bus
from imagebus.catalog import load_catalog
from imagebus.launcher import torch_threads_per_worker
from imagebus.process import free_port
from schemas import GenerationParams, JobFailed, JobSucceeded
from workers.backends.base import JobRequest
from workers.backends.diffusers import DiffusersBackend
from workers.encoding import ImageFormat

BODY = {"prompt": "a red fox in snow", "width": 64, "height": 64, "num_inference_steps": 4, "num_images": 1}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class DirectCall:
    """The same tiny pipeline, called in this process without imagebus."""

    def __init__(self, threads: int) -> None:
        # The model's thread (the backend's executor, started below) takes the count in force now.
        torch.set_num_threads(threads)
        self.threads = threads
        self.loop = asyncio.new_event_loop()
        self.backend = DiffusersBackend(load_catalog())
        self.loop.run_until_complete(self.backend.prepare("tiny-sd"))
        self.params = GenerationParams(model="tiny-sd", guidance_scale=7.5, **BODY)
        self.image_format = ImageFormat()
        for _ in range(3):
            self.once()

    def once(self) -> float:
        start = time.perf_counter()
        job = JobRequest(job_id="bench", params=self.params, on_progress=lambda _p: None)
        for image in self.loop.run_until_complete(self.backend.generate(job)):
            self.image_format.encode(image).content.close()  # a server would encode its answer too
        return time.perf_counter() - start


STAGES = (
    "POST answered",
    "submit → JobQueued",
    "JobQueued → JobStarted",
    "JobStarted → ImageStored",
    "ImageStored → JobSucceeded",
    "JobSucceeded → visible",
)


def _stages(walls: list[float], events: dict[str, float], visible: float) -> dict[str, float]:
    submit, answered = walls
    at = [submit, events["JobQueued"], events["JobStarted"], events["ImageStored"], events["JobSucceeded"], visible]
    return {
        STAGES[0]: (answered - submit) * 1000,
        **{name: (after - before) * 1000 for name, before, after in zip(STAGES[1:], at[:-1], at[1:], strict=True)},
    }


class Stack:
    """`imagebus up` in a temporary data dir, an HTTP client, and a bus connection for events."""

    def __init__(self, workers: int, batch_linger_s: float | None, torch_threads: int) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="imagebus-bench-"))
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBUS_")}
        if batch_linger_s is not None:
            env["IMAGEBUS_WORKER_BATCH_LINGER_S"] = str(batch_linger_s)
        argv = ["up", "--port", str(port), "--data-dir", str(self.data_dir), "--workers", str(workers)]
        argv += ["--torch-threads", str(torch_threads)]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imagebus", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        assert self.process.stdout is not None
        key = next((line.split()[2] for line in self.process.stdout if line.startswith("API key: ")), "")
        if not key:
            raise RuntimeError("imagebus up did not start")
        settings = dict(line.strip().split("=", 1) for line in (self.data_dir / "env").read_text().splitlines())
        self.bus_url = settings["IMAGEBUS_BUS_URL"]
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": key}, timeout=30)

    async def run_jobs(self, bus: Bus, count: int, stages: list[dict[str, float]] | None = None) -> list[float]:
        """Submit ``count`` jobs at once; seconds from each submit until the API shows it completed.
        With ``stages``, each job's milliseconds between the steps on its way (from the events'
        own timestamps: one machine, one clock) are added to it."""
        async with bus.watch_events() as live:
            submitted: dict[str, float] = {}
            walls: dict[str, list[float]] = {}
            events: dict[str, dict[str, float]] = {}
            for _ in range(count):
                start, wall = time.perf_counter(), time.time()
                response = await self.client.post("/api/generate", json=BODY)
                job_id = response.json()["job_id"]
                submitted[job_id] = start
                walls[job_id] = [wall, time.time()]
                events[job_id] = {}
            finished: list[str] = []
            async for event in live:
                if event.job_id in submitted:
                    events[event.job_id].setdefault(event.type, event.occurred_at.timestamp())
                if event.job_id in submitted and isinstance(event, JobSucceeded | JobFailed):
                    if isinstance(event, JobFailed):
                        raise RuntimeError(f"job {event.job_id} failed: {event.error}")
                    finished.append(event.job_id)
                    if len(finished) == count:
                        break
        latencies = []
        for job_id in finished:
            # Polling is the point here: this is what "visible through the API" means.
            while (await self.client.get(f"/api/jobs/{job_id}")).json()["status"] != "completed":  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            latencies.append(time.perf_counter() - submitted[job_id])
            if stages is not None:
                stages.append(_stages(walls[job_id], events[job_id], time.time()))
        return latencies

    async def close(self) -> None:
        await self.client.aclose()
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=120)


async def measure(
    workers: int, jobs: int, directs: dict[int, DirectCall], batch_linger_s: float | None, torch_threads: int | None
) -> dict[str, float]:
    # The baseline runs the model with as many threads as each worker does: a fewer-thread model is
    # faster here (tiny-sd at 64x64) and would otherwise count as the stack's gain or loss.
    threads = torch_threads_per_worker(workers, torch_threads)
    direct = directs[threads]
    stack = Stack(workers, batch_linger_s, threads)
    bus = await connect_bus(stack.bus_url, BusOptions())
    try:
        await stack.run_jobs(bus, 3 * workers)  # warm up every worker (first call pays for lazy init)
        latencies: list[float] = []
        baseline: list[float] = []
        stages: list[dict[str, float]] = []
        for _ in range(jobs):  # interleaved, so both see the same machine
            latencies.append((await stack.run_jobs(bus, 1, stages))[0])
            # Off this loop: the direct call drives its own, which cannot run inside a running one.
            baseline.append(await asyncio.to_thread(direct.once))
        start = time.perf_counter()
        await stack.run_jobs(bus, jobs)
        elapsed = time.perf_counter() - start
    finally:
        await bus.close()
        await stack.close()
    return {
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "direct_p50": percentile(baseline, 50),
        "jobs_per_s": jobs / elapsed,
        **{name: percentile([stage[name] for stage in stages], 50) for name in STAGES},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-linger-s", type=float, default=None, help="the workers' batch linger (default 0.05)")
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="each worker's model threads (default: the cores shared)"
    )
    args = parser.parse_args()

    direct = DirectCall(os.cpu_count() or 1)
    directs = {direct.threads: direct}
    for workers in args.workers:  # built here: a DirectCall runs its own loop, not inside measure's
        threads = torch_threads_per_worker(workers, args.torch_threads)
        if threads not in directs:
            directs[threads] = DirectCall(threads)
    quiet = [direct.once() for _ in range(args.jobs)]
    print(
        f"direct tiny-sd call (64x64, 4 steps, 1 image, {direct.threads} threads) on a quiet machine: "
        f"p50 {percentile(quiet, 50) * 1000:.1f} ms,"
        f" p99 {percentile(quiet, 99) * 1000:.1f} ms, {1 / percentile(quiet, 50):.1f} calls/s"
    )
    print()
    print(
        "| workers | model threads each | submit→completed p50 | p99 | direct call p50 (stack up, same threads) "
        "| overhead p50 | overhead p99 | jobs/s (batch of N) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for workers in args.workers:
        r = asyncio.run(measure(workers, args.jobs, directs, args.batch_linger_s, args.torch_threads))
        results.append((workers, r))
        print(
            f"| {workers} | {torch_threads_per_worker(workers, args.torch_threads)} | {r['p50'] * 1000:.1f} ms "
            f"| {r['p99'] * 1000:.1f} ms | {r['direct_p50'] * 1000:.1f} ms "
            f"| {(r['p50'] - r['direct_p50']) * 1000:.1f} ms | {(r['p99'] - r['direct_p50']) * 1000:.1f} ms "
            f"| {r['jobs_per_s']:.2f} |",
            flush=True,
        )
    print()
    print("Where a lone job's time goes, p50 of each step (ms; JobStarted → ImageStored includes the model):")
    print()
    print("| workers | " + " | ".join(STAGES) + " |")
    print("|---" * (len(STAGES) + 1) + "|")
    for workers, r in results:
        print(f"| {workers} | " + " | ".join(f"{r[name]:.1f}" for name in STAGES) + " |")


if __name__ == "__main__":
    main()
