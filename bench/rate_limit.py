"""What the rate limiter costs per request, on SQLite and on PostgreSQL.

Three ingress replicas run side by side as `imagebus ingress` processes over the same database:
one with the limiter off (both limits 0), one with both limits on but set too high to refuse
anything (every request is counted for its key and its address, and the replica syncs the counts
with the shared rows at most every 0.1 s), and one whose limits were spent by its first request
(``over``: every request after it is refused, which costs no I/O). The client alternates rounds
between them, so all see the same machine and the same noise:

    latency    one request at a time, median and p99 per replica
    requests/s ``--concurrency`` requests in flight
    added      the median latency with the limiter minus without; and 1/rps_on - 1/rps_off

The route is GET /api/models with a key: it touches neither the bus nor the database, so the
limiter's syncs are the only database work and their cost is not diluted. No projector runs, so
on SQLite the counting never waits for another writer (a busy projector would add its waits).

PostgreSQL is expected at 127.0.0.1:5432 (user postgres), as for the tests; it is skipped with a
note when not there.

Usage: python bench/rate_limit.py [--requests 400] [--rounds 5] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import asyncpg
import httpx
from worker_runs import ingress_process

KEY = "bench-" + uuid.uuid4().hex
ROUTE = "/api/models"
POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# Per mode: both limits, and what every request after the first is answered.
MODES = {"off": ("0", 200), "on": ("1000000000", 200), "over": ("1", 429)}


@asynccontextmanager
async def replica(database_url: str, mode: str) -> AsyncIterator[httpx.AsyncClient]:
    """An `imagebus ingress` process and a client for it; the limiter off, on, or spent."""
    limit, status = MODES[mode]
    settings = {
        "IMAGEBUS_BUS_URL": f"memory://{uuid.uuid4().hex}",
        "IMAGEBUS_DATABASE_URL": database_url,
        "IMAGEBUS_API_KEYS": KEY,
        "IMAGEBUS_KEY_SECRET": uuid.uuid4().hex,
        "IMAGEBUS_LOG_LEVEL": "warning",
        "IMAGEBUS_INGRESS_RATE_LIMIT_KEY": limit,
        "IMAGEBUS_INGRESS_RATE_LIMIT_IP": limit,
    }
    async with (
        ingress_process(settings) as (port, _pid),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": KEY}, timeout=30) as client,
    ):
        # "over": its first request spends the limits (unless another replica's already
        # spent the address's, which they share).
        response = await client.get(ROUTE)
        assert response.status_code in (200, status), response.text
        assert ("RateLimit" in response.headers) == (mode != "off"), response.headers
        yield client


async def sequential(client: httpx.AsyncClient, requests: int, status: int) -> list[float]:
    latencies = []
    for _ in range(requests):
        start = time.perf_counter()
        response = await client.get(ROUTE)
        latencies.append(time.perf_counter() - start)
        assert response.status_code == status, response.text
    return latencies


async def concurrent(client: httpx.AsyncClient, requests: int, concurrency: int, status: int) -> float:
    """Requests per second with ``concurrency`` in flight."""

    async def one_lane() -> None:
        for _ in range(requests // concurrency):
            assert (await client.get(ROUTE)).status_code == status

    start = time.perf_counter()
    await asyncio.gather(*(one_lane() for _ in range(concurrency)))
    return (requests // concurrency) * concurrency / (time.perf_counter() - start)


async def measure(database_url: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    async with AsyncExitStack() as stack:
        clients = {mode: await stack.enter_async_context(replica(database_url, mode)) for mode in MODES}
        for mode, client in clients.items():  # warm up connections, caches and the counter rows
            await sequential(client, 100, MODES[mode][1])
        latencies: dict[str, list[float]] = {name: [] for name in clients}
        throughput: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(args.rounds):  # interleaved, so the replicas see the same machine
            for name, client in clients.items():
                status = MODES[name][1]
                latencies[name] += await sequential(client, args.requests, status)
                throughput[name].append(await concurrent(client, args.requests, args.concurrency, status))
    return {
        name: {
            "p50_ms": percentile(latencies[name], 50) * 1e3,
            "p99_ms": percentile(latencies[name], 99) * 1e3,
            "rps": statistics.median(throughput[name]),
        }
        for name in clients
    }


@asynccontextmanager
async def postgres_database() -> AsyncIterator[str | None]:
    name = f"imagebus_bench_{uuid.uuid4().hex[:12]}"
    try:
        admin = await asyncpg.connect(**POSTGRES, database="postgres", timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as error:
        print(f"postgresql: skipped, not reachable at {POSTGRES['host']}:{POSTGRES['port']} ({error})")
        yield None
        return
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql://{POSTGRES['user']}@{POSTGRES['host']}:{POSTGRES['port']}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def report(kind: str, figures: dict[str, dict[str, float]]) -> None:
    off, on = figures["off"], figures["on"]
    for name, row in figures.items():
        print(
            f"{kind:<10} limiter {name:<4}  p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  "
            f"{row['rps']:7.0f} requests/s"
        )
    added_latency_ms = on["p50_ms"] - off["p50_ms"]
    added_per_request_ms = (1 / on["rps"] - 1 / off["rps"]) * 1e3
    print(
        f"{kind:<10} added by the limiter: {added_latency_ms:+.2f} ms median latency, "
        f"{added_per_request_ms:+.3f} ms of replica time per request under load "
        f"({(on['rps'] / off['rps'] - 1) * 100:+.0f} % requests/s)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="requests per replica per round and mode")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    print(f"GET {ROUTE}, {args.rounds} rounds of {args.requests} requests, {args.concurrency} in flight under load")
    with tempfile.TemporaryDirectory(prefix="imagebus-bench-ratelimit-") as folder:
        report("sqlite", await measure(f"sqlite:///{Path(folder) / 'readmodel.db'}", args))
    async with postgres_database() as url:
        if url is not None:
            report("postgresql", await measure(url, args))


if __name__ == "__main__":
    asyncio.run(main())
