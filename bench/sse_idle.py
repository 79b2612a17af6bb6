"""What idle event streams cost an ingress: N open SSE streams of pending jobs, one process.

One `imagebus ingress` process runs over NATS (a nats-server of its own) and a SQLite read model
holding N pending jobs. The jobs are written with the ingress's own read-your-writes insert
(``ReadModel.record_queued``), not submitted, so 5,000 of them take a second rather than minutes of
submits, and no worker exists to take them: every stream stays pending. The bench opens one stream
per job (raw HTTP/1.1 connections, drained as keep-alives arrive), lets them settle, and reads the
ingress process's CPU time from /proc over ``--seconds``: cores = CPU seconds / wall seconds.
Counts are cumulative (1,000 streams, then 4,000 more for 5,000), and a count the file-descriptor
limit cannot hold (two per stream on one machine: the client's and the server's) is skipped
with a note; the bench raises its soft RLIMIT_NOFILE to the hard limit first, which the ingress
inherits.

Usage: python bench/sse_idle.py [--streams 1000 5000] [--seconds 20] [--bus nats|memory]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from worker_runs import cpu_seconds, ingress_process

from imagebus.nats_server import start_nats
from imagebus.process import free_port
from ingress.auth import KeyRing
from projector.database import create_database, create_schema
from projector.readside import ReadModel
from schemas import GenerationParams, JobQueued

KEY = "bench-" + uuid.uuid4().hex
SECRET = uuid.uuid4().hex
# Connections opened at once while building up the streams (under the listen backlog).
_OPEN_AT_ONCE = 200
# File descriptors kept aside for everything but the streams (logs, database, bus, listeners).
_SPARE_FDS = 200


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def write_pending_jobs(database_url: str, count: int) -> list[str]:
    owner = (await KeyRing((KEY,), SECRET).principal_for_key(KEY)).owner  # type: ignore[union-attr]
    params = GenerationParams(
        prompt="idle", model="tiny-sd", width=64, height=64, num_inference_steps=4, guidance_scale=7.0
    )
    database = create_database(database_url)
    try:
        await create_schema(database)
        read_model = ReadModel(database)
        jobs = [
            JobQueued(job_id=uuid.uuid4().hex, owner=owner, backend="diffusers", params=params) for _ in range(count)
        ]
        for event in jobs:
            await read_model.record_queued(event)
    finally:
        await database.dispose()
    return [event.job_id for event in jobs]


@dataclass
class Ingress:
    port: int
    pid: int


@asynccontextmanager
async def ingress(bus_url: str, database_url: str, max_streams: int) -> AsyncIterator[Ingress]:
    settings = {
        "IMAGEBUS_BUS_URL": bus_url,
        "IMAGEBUS_BUS_NAMESPACE": f"bench{uuid.uuid4().hex[:8]}",
        "IMAGEBUS_DATABASE_URL": database_url,
        "IMAGEBUS_API_KEYS": KEY,
        "IMAGEBUS_KEY_SECRET": SECRET,
        "IMAGEBUS_LOG_LEVEL": "warning",
        "IMAGEBUS_INGRESS_RATE_LIMIT_KEY": "0",
        "IMAGEBUS_INGRESS_RATE_LIMIT_IP": "0",
        "IMAGEBUS_INGRESS_MAX_STREAMS": str(max_streams),
        "IMAGEBUS_INGRESS_MAX_CONNECTIONS": str(max_streams + 1000),
    }
    async with ingress_process(settings, log_prefix="imagebus-bench-sse-", stop_timeout_s=60) as (port, pid):
        yield Ingress(port, pid)


class Stream:
    """One open event stream, its bytes drained as they come (keep-alives every 15 s)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._drain = asyncio.create_task(self._read_all(reader))

    @staticmethod
    async def _read_all(reader: asyncio.StreamReader) -> None:
        with suppress(ConnectionError):
            while await reader.read(65536):
                pass

    @classmethod
    async def open(cls, port: int, job_id: str) -> Stream:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /api/sse/{job_id} HTTP/1.1\r\nHost: bench\r\nX-API-Key: {KEY}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"stream refused: {head.decode(errors='replace').splitlines()[0]}")
        # The first event: the job's position in the queue. The stream is now idle.
        first = await reader.readuntil(b"\r\n\r\n")
        if b'"pending"' not in first:
            raise RuntimeError(f"unexpected first event: {first!r}")
        return cls(reader, writer)

    async def close(self) -> None:
        self._drain.cancel()
        self._writer.close()
        with suppress(Exception):
            await self._writer.wait_closed()


async def open_streams(port: int, job_ids: list[str]) -> list[Stream]:
    streams: list[Stream] = []
    for start in range(0, len(job_ids), _OPEN_AT_ONCE):
        batch = job_ids[start : start + _OPEN_AT_ONCE]
        streams += await asyncio.gather(*(Stream.open(port, job_id) for job_id in batch))
    return streams


async def cores_over(pid: int, seconds: float) -> float:
    started, cpu = time.monotonic(), cpu_seconds(pid)
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - cpu) / (time.monotonic() - started)


async def measure(bus_url: str, counts: list[int], seconds: float, folder: Path) -> None:
    fd_limit = raise_fd_limit()
    fitting = [n for n in counts if 2 * n + _SPARE_FDS <= fd_limit]
    for n in sorted(set(counts) - set(fitting)):
        print(f"{n:>6} streams: skipped, RLIMIT_NOFILE {fd_limit} holds at most {(fd_limit - _SPARE_FDS) // 2}")
    if not fitting:
        return
    database_url = f"sqlite:///{folder / 'readmodel.db'}"
    job_ids = await write_pending_jobs(database_url, max(fitting))
    async with ingress(bus_url, database_url, max_streams=max(fitting) + 100) as process:
        streams: list[Stream] = []
        try:
            print(f"{0:>6} streams: {await cores_over(process.pid, seconds):.3f} cores (ingress process)")
            for n in sorted(fitting):
                streams += await open_streams(process.port, job_ids[len(streams) : n])
                await asyncio.sleep(3.0)  # let the opening burst settle
                cores = await cores_over(process.pid, seconds)
                print(f"{n:>6} streams: {cores:.3f} cores (ingress process, {seconds:.0f} s)")
        finally:
            await asyncio.gather(*(stream.close() for stream in streams))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--bus", choices=["nats", "memory"], default="nats")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imagebus-bench-sse-") as name:
        folder = Path(name)
        if args.bus == "memory":
            await measure(f"memory://{uuid.uuid4().hex}", args.streams, args.seconds, folder)
            return
        port = free_port()
        server = start_nats(folder / "nats", port, folder / "nats.log")
        try:
            await measure(f"nats://127.0.0.1:{port}", args.streams, args.seconds, folder)
        finally:
            server.stop(grace_s=5)


if __name__ == "__main__":
    asyncio.run(main())
