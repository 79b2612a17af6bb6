"""End-to-end overhead of imagebus over calling the same tiny pipeline directly, and jobs/s.

Runs the real embedded stack (`imagebus up`: NATS, SeaweedFS S3, SQLite, projector, reaper,
worker processes, ingress) and talks to it over HTTP like a client would.

    overhead = (submit → `completed` visible through GET /api/jobs/{id}) - (direct pipeline call)

Usage: python bench/overhead.py [--jobs 40] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from imagebus.catalog import load_catalog
from imagebus.process import free_port
from schemas import GenerationParams
from workers.backends.base import CancelToken
from workers.backends.diffusers import DiffusersBackend

BODY = {"prompt": "a red fox in snow", "width": 64, "height": 64, "num_inference_steps": 4, "num_images": 1}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def direct_call_seconds(samples: int) -> list[float]:
    backend = DiffusersBackend(load_catalog())
    backend.prepare("tiny-sd")
    params = GenerationParams(model="tiny-sd", guidance_scale=7.5, **BODY)
    for _ in range(3):
        backend.generate(params, lambda _p: None, CancelToken())
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        backend.generate(params, lambda _p: None, CancelToken())
        times.append(time.perf_counter() - start)
    return times


class Stack:
    def __init__(self, workers: int) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="imagebus-bench-"))
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBUS_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imagebus", "up", "--port", str(self.port), "--data-dir", str(self.data_dir),
             "--workers", str(workers)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        key = ""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("API key: "):
                key = line.split()[2]
                break
        if not key:
            raise RuntimeError("imagebus up did not start")
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", headers={"X-API-Key": key}, timeout=30)

    def run_job(self, poll_s: float = 0.002) -> float:
        start = time.perf_counter()
        job_id = self.client.post("/api/generate", json=BODY).json()["job_id"]
        while True:
            status = self.client.get(f"/api/jobs/{job_id}").json()["status"]
            if status == "completed":
                return time.perf_counter() - start
            if status in ("failed", "canceled"):
                raise RuntimeError(f"job {job_id} {status}")
            time.sleep(poll_s)

    def close(self) -> None:
        self.client.close()
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=120)


def measure(workers: int, jobs: int) -> dict[str, float]:
    stack = Stack(workers)
    try:
        for _ in range(3 * workers):  # warm up every worker (first call pays for lazy init)
            stack.run_job()
        latencies = [stack.run_job() for _ in range(jobs)]
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda _: stack.run_job(poll_s=0.01), range(jobs)))
        elapsed = time.perf_counter() - start
    finally:
        stack.close()
    return {
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "jobs_per_s": jobs / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    direct = direct_call_seconds(args.jobs)
    direct_p50 = percentile(direct, 50)
    print(f"direct tiny-sd call (64x64, 4 steps, 1 image): p50 {direct_p50 * 1000:.1f} ms, "
          f"p99 {percentile(direct, 99) * 1000:.1f} ms, {1 / direct_p50:.1f} calls/s")  # fmt: skip
    print()
    print("| workers | submit→completed p50 | p99 | overhead p50 | overhead p99 | jobs/s |")
    print("|---|---|---|---|---|---|")
    for workers in args.workers:
        result = measure(workers, args.jobs)
        print(
            f"| {workers} | {result['p50'] * 1000:.1f} ms | {result['p99'] * 1000:.1f} ms "
            f"| {(result['p50'] - direct_p50) * 1000:.1f} ms | {(result['p99'] - direct_p50) * 1000:.1f} ms "
            f"| {result['jobs_per_s']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
