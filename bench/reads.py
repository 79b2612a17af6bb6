"""Status reads against the cheapest route on one ingress: GET /api/jobs/{id} vs GET /health.

One `imagebus ingress` process (an in-process bus of its own, a SQLite read model) answers both.
The job is a completed one with one image, its rows written by the projector itself from its
events, so a read pays for everything a status poll does: the key, the read model, the view, a
presigned URL and two signed links. A raw HTTP/1.1 client (``--concurrency`` keep-alive
connections, so the client costs little of the shared cores) alternates rounds between the two
routes, so both see the same machine, and reports per route:

    requests/s           what the client got
    per ingress core     requests / CPU seconds the ingress process spent meanwhile (from /proc),
                         the figure that does not depend on what else the machine was doing

and the job route's share of /health's. The rate limiter is off unless ``--rate-limits`` (its
cost is bench/rate_limit.py's subject).

--profile DIR then runs each route once more with py-spy sampling the ingress and prints where its
samples went (bench/control_plane.py's tables; raw stacks kept in DIR).

Usage: python bench/reads.py [--requests 2000] [--rounds 5] [--concurrency 8] [--rate-limits] [--profile DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from control_plane import start_profilers, stop_profilers, summarise
from worker_runs import cpu_seconds, ingress_process

from bus import BusOptions, connect_bus
from ingress.auth import KeyRing
from projector.database import create_database, create_schema
from projector.service import Projector
from schemas import (
    Event,
    GenerationParams,
    ImageStored,
    JobQueued,
    JobStarted,
    JobSucceeded,
    image_id_for,
    new_id,
)

KEY = "bench-" + uuid.uuid4().hex
SECRET = uuid.uuid4().hex
_CONTENT_LENGTH = re.compile(rb"content-length:\s*(\d+)", re.IGNORECASE)


async def write_completed_job(database_url: str) -> str:
    """A completed job with one image, projected from its events; its id."""
    owner = (await KeyRing((KEY,), SECRET).principal_for_key(KEY)).owner  # type: ignore[union-attr]
    job_id = new_id()
    params = GenerationParams(
        prompt="a lighthouse", model="tiny-sd", width=64, height=64, num_inference_steps=4, guidance_scale=7.0
    )
    image_id = image_id_for(job_id, 0)
    events: list[Event] = [
        JobQueued(job_id=job_id, owner=owner, backend="diffusers", params=params),
        JobStarted(job_id=job_id, worker_id="bench", attempt=1),
        ImageStored(
            job_id=job_id,
            image_id=image_id,
            index=0,
            object_key=f"images/{job_id}/0.png",
            content_type="image/png",
            width=64,
            height=64,
            size_bytes=1000,
            expires_at=datetime.now(UTC) + timedelta(hours=1),  # unexpired for the whole bench
        ),
        JobSucceeded(job_id=job_id, image_ids=[image_id]),
    ]
    database = create_database(database_url)
    bus = await connect_bus(f"memory://{uuid.uuid4().hex}", BusOptions(namespace="bench"))
    try:
        await create_schema(database)
        for event in events:
            await bus.publish_event(event)
        await Projector(database, bus).run(idle_timeout_s=0.2)
    finally:
        await bus.close()
        await database.dispose()
    return job_id


@dataclass
class Ingress:
    port: int
    pid: int


@asynccontextmanager
async def ingress(database_url: str, *, rate_limits: bool) -> AsyncIterator[Ingress]:
    limit = "1000000000" if rate_limits else "0"
    settings = {
        "IMAGEBUS_BUS_URL": f"memory://{uuid.uuid4().hex}",
        "IMAGEBUS_DATABASE_URL": database_url,
        "IMAGEBUS_API_KEYS": KEY,
        "IMAGEBUS_KEY_SECRET": SECRET,
        "IMAGEBUS_LOG_LEVEL": "warning",
        "IMAGEBUS_INGRESS_RATE_LIMIT_KEY": limit,
        "IMAGEBUS_INGRESS_RATE_LIMIT_IP": limit,
    }
    async with ingress_process(settings, log_prefix="imagebus-bench-reads-") as (port, pid):
        yield Ingress(port, pid)


async def lane(port: int, path: str, count: int) -> None:
    """``count`` GETs of ``path``, one after another on one keep-alive connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\nX-API-Key: {KEY}\r\n\r\n".encode()
    try:
        for _ in range(count):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"GET {path}: {head.decode(errors='replace').splitlines()[0]}")
            length = _CONTENT_LENGTH.search(head)
            if length is None:
                raise RuntimeError(f"GET {path}: no Content-Length in {head!r}")
            await reader.readexactly(int(length[1]))
    finally:
        writer.close()


@dataclass
class Round:
    rps: float
    per_core: float


async def one_round(process: Ingress, path: str, requests: int, concurrency: int) -> Round:
    per_lane = requests // concurrency
    started, cpu = time.perf_counter(), cpu_seconds(process.pid)
    await asyncio.gather(*(lane(process.port, path, per_lane) for _ in range(concurrency)))
    elapsed, spent = time.perf_counter() - started, cpu_seconds(process.pid) - cpu
    done = per_lane * concurrency
    return Round(rps=done / elapsed, per_core=done / max(spent, 1e-9))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per route per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rate-limits", action="store_true", help="count every request (limits too high to refuse)")
    parser.add_argument("--profile", metavar="DIR", help="then profile each route with py-spy, raw stacks into DIR")
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imagebus-bench-reads-") as folder:
        database_url = f"sqlite:///{Path(folder) / 'readmodel.db'}"
        job_id = await write_completed_job(database_url)
        routes = {"GET /api/jobs/{id}": f"/api/jobs/{job_id}", "GET /health": "/health"}
        async with ingress(database_url, rate_limits=args.rate_limits) as process:
            for path in routes.values():  # warm up: connections, caches, statement compilation
                await one_round(process, path, 200, args.concurrency)
            rounds: dict[str, list[Round]] = {name: [] for name in routes}
            for _ in range(args.rounds):  # interleaved, so both routes see the same machine
                for name, path in routes.items():
                    rounds[name].append(await one_round(process, path, args.requests, args.concurrency))
            for name, path in routes.items() if args.profile else ():
                # One file per route, so the two profiles can be set side by side.
                label = "ingress " + name.replace("/", "_").replace(" ", "").replace("{id}", "id")
                profilers = start_profilers({label: process.pid}, Path(args.profile), args.profile_rate)
                try:
                    await asyncio.sleep(1.0)  # py-spy attaches
                    await one_round(process, path, args.requests * 2, args.concurrency)
                finally:
                    stop_profilers(profilers)
    limiter = "on" if args.rate_limits else "off"
    print(
        f"{args.rounds} rounds of {args.requests} requests per route, {args.concurrency} in flight, limiter {limiter}"
    )
    medians = {}
    for name, results in rounds.items():
        rps = statistics.median(r.rps for r in results)
        per_core = statistics.median(r.per_core for r in results)
        medians[name] = (rps, per_core)
        print(f"{name:<20} {rps:7.0f} requests/s   {per_core:7.0f} requests per ingress core")
    (job_rps, job_core), (health_rps, health_core) = medians.values()
    print(
        f"job reads at {job_rps / health_rps * 100:.0f} % of /health's requests/s "
        f"({job_core / health_core * 100:.0f} % per ingress core)"
    )
    if args.profile:
        print(f"\nEach route under py-spy ({args.profile_rate} Hz, raw stacks in {args.profile}):")
        summarise(Path(args.profile))


if __name__ == "__main__":
    asyncio.run(main())
