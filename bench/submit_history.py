"""What a submit, and a read of a queued job's position, cost with 100 and with 100,000 jobs in the
owner's history (issue 14, goal 3).

Two `imagebus ingress` processes run side by side, each over a SQLite read model of its own that
differs only in the history of the bench's key: ``--small`` jobs in one, ``--large`` in the other
(most completed, a few still pending, spread over the last 30 days, a tenth of them today). The
history rows are the projector's own (``queued_row`` of a JobQueued, then finished), written in
bulk into the jobs table before the rest of the schema is created, so a read model that keeps
usage counters counts them once as it would on an upgrade. The bus is in-memory and no projector
or worker runs: a submit is auth, rate limit (on, set too high to refuse), the quota check, the
queue bound, two publishes and the read-your-writes insert.

Rounds alternate between the two ingresses (the order flips each round), ``--submits`` sequential
POST /api/generate each, then ``--reads`` sequential GET /api/status/{id} (CyberImage's status,
which counts the jobs queued ahead) of one of the history's pending jobs. Per round: the ingress
process's CPU time (user + system, from /proc) over the round divided by the requests, and the
median latency seen by the client. The tables give min / median / max over the rounds.

Usage: python bench/submit_history.py [--small 100] [--large 100000] [--submits 200] [--reads 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import hmac
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from worker_runs import cpu_seconds, ingress_process

from projector.apply import queued_row
from projector.database import create_database, create_schema, insert_if_absent
from projector.tables import jobs
from schemas import GenerationParams, JobQueued, JobStatus

KEY = "bench-" + uuid.uuid4().hex
SECRET = uuid.uuid4().hex
OWNER = hmac.new(SECRET.encode(), KEY.encode(), hashlib.sha256).hexdigest()[:32]
MODEL = "tiny-sd"
BODY = {"prompt": "a lighthouse at dusk", "model": MODEL, "num_images": 1}
# Jobs of the history still pending: the active-jobs count has something to count.
ACTIVE = 20
CHUNK = 5_000


async def write_history(database_url: str, size: int) -> str:
    """``size`` jobs of the bench's owner, written straight into the read model, then the schema;
    the id of one still pending."""
    database = create_database(database_url)
    now = datetime.now(UTC)
    params = GenerationParams(
        prompt="an old job", model=MODEL, width=512, height=512, num_inference_steps=4, guidance_scale=0.0
    )
    pending = ""
    try:
        await database.write(lambda conn: jobs.create(conn))
        for start in range(0, size, CHUNK):
            rows = []
            for k in range(start, min(size, start + CHUNK)):
                # A tenth today, the rest over the last 30 days; the newest few still pending.
                age = timedelta(seconds=k % 3_600) if k % 10 == 0 else timedelta(minutes=(k * 7919) % (30 * 1440))
                event = JobQueued(
                    job_id=uuid.uuid4().hex, owner=OWNER, backend="diffusers", params=params, occurred_at=now - age
                )
                row = queued_row(event)
                if k >= ACTIVE:
                    row = replace(row, status=JobStatus.COMPLETED, completed_at=row.created_at, step=4)
                else:
                    pending = row.id
                rows.append(row.to_columns())
            await database.write(functools.partial(insert_if_absent, table=jobs, rows=rows))
        await create_schema(database)
    finally:
        await database.dispose()
    return pending


@asynccontextmanager
async def ingress(database_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, int]]:
    """An `imagebus ingress` process over ``database_url``, a client for it, and its pid."""
    settings = {
        "IMAGEBUS_BUS_URL": f"memory://{uuid.uuid4().hex}",
        "IMAGEBUS_DATABASE_URL": database_url,
        "IMAGEBUS_API_KEYS": KEY,
        "IMAGEBUS_KEY_SECRET": SECRET,
        "IMAGEBUS_LOG_LEVEL": "warning",
        "IMAGEBUS_INGRESS_QUOTA_ACTIVE_JOBS": str(10**9),
        "IMAGEBUS_INGRESS_QUOTA_DAILY_IMAGES": str(10**9),
        "IMAGEBUS_INGRESS_MAX_QUEUE_DEPTH": str(10**9),
        "IMAGEBUS_INGRESS_RATE_LIMIT_KEY": str(10**9),
        "IMAGEBUS_INGRESS_RATE_LIMIT_IP": str(10**9),
    }
    async with (
        ingress_process(settings) as (port, pid),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": KEY}, timeout=30) as client,
    ):
        yield client, pid


async def submit_round(client: httpx.AsyncClient, pid: int, submits: int) -> tuple[float, float]:
    """CPU-ms of the ingress per submit, and the median latency in ms, over ``submits`` submits."""
    latencies = []
    cpu_before = cpu_seconds(pid)
    for _ in range(submits):
        start = time.perf_counter()
        response = await client.post("/api/generate", json=BODY)
        latencies.append(time.perf_counter() - start)
        assert response.status_code == 202, response.text
    return (cpu_seconds(pid) - cpu_before) / submits * 1e3, statistics.median(latencies) * 1e3


async def status_round(client: httpx.AsyncClient, pid: int, job_id: str, reads: int) -> tuple[float, float]:
    """CPU-ms of the ingress per read of a queued job's status (with its queue position), and the
    median latency in ms, over ``reads`` reads."""
    latencies = []
    cpu_before = cpu_seconds(pid)
    for _ in range(reads):
        start = time.perf_counter()
        response = await client.get(f"/api/status/{job_id}")
        latencies.append(time.perf_counter() - start)
        assert response.status_code == 200 and response.json()["status"] == "pending", response.text
    return (cpu_seconds(pid) - cpu_before) / reads * 1e3, statistics.median(latencies) * 1e3


def spread(values: list[float]) -> str:
    return f"{min(values):7.2f} {statistics.median(values):7.2f} {max(values):7.2f}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=100, help="jobs in the short history")
    parser.add_argument("--large", type=int, default=100_000, help="jobs in the long history")
    parser.add_argument("--submits", type=int, default=200, help="submits per ingress per round")
    parser.add_argument("--reads", type=int, default=200, help="status reads per ingress per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sizes = (args.small, args.large)
    with tempfile.TemporaryDirectory(prefix="imagebus-bench-history-") as folder:
        urls = {size: f"sqlite:///{Path(folder) / f'history-{size}.db'}" for size in sizes}
        started = time.perf_counter()
        queued = {size: await write_history(url, size) for size, url in urls.items()}
        print(f"histories of {' and '.join(map(str, sizes))} jobs written in {time.perf_counter() - started:.1f} s")
        async with AsyncExitStack() as stack:
            ingresses = {size: await stack.enter_async_context(ingress(urls[size])) for size in sizes}
            for size, (client, pid) in ingresses.items():  # warm up: imports, connections, statement caches
                await submit_round(client, pid, 50)
                await status_round(client, pid, queued[size], 20)
            cpu: dict[int, list[float]] = {size: [] for size in sizes}
            latency: dict[int, list[float]] = {size: [] for size in sizes}
            read_cpu: dict[int, list[float]] = {size: [] for size in sizes}
            read_latency: dict[int, list[float]] = {size: [] for size in sizes}
            for round_ in range(args.rounds):
                for size in sizes if round_ % 2 == 0 else sizes[::-1]:
                    per_submit, median = await submit_round(*ingresses[size], args.submits)
                    cpu[size].append(per_submit)
                    latency[size].append(median)
                    per_read, median = await status_round(*ingresses[size], queued[size], args.reads)
                    read_cpu[size].append(per_read)
                    read_latency[size].append(median)
    print(f"{args.rounds} interleaved rounds; min / median / max over rounds")
    for what, count, cpus, latencies in (
        ("submit", args.submits, cpu, latency),
        ("queued job's status", args.reads, read_cpu, read_latency),
    ):
        print(f"\n{count} sequential requests a round: {what}")
        print(f"{'history (jobs)':>15}  {'ingress CPU-ms per request':>26}  {'latency p50 ms':>23}")
        for size in sizes:
            print(f"{size:>15}  {spread(cpus[size]):>26}  {spread(latencies[size]):>23}")
        ratio = statistics.median(cpus[args.large]) / statistics.median(cpus[args.small])
        print(f"CPU per {what}, {args.large} vs {args.small} jobs of history: {ratio:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
