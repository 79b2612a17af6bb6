"""What the benchmarks share: a throwaway S3 server, timing jobs through a Worker, the embedded stack
(`imagebus up`) as a subprocess with its role processes named, a lone `imagebus ingress` process,
and their CPU time from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from bus import BusOptions, connect_bus
from imagebus.process import free_port, port_open
from imagebus.s3_server import start_s3_server
from schemas import GenerateImage, GenerationParams, JobFailed, JobSucceeded
from storage.object_store import ObjectStore, S3Config
from workers.backends.base import Backend
from workers.runtime import Worker, WorkerOptions


@asynccontextmanager
async def bench_store() -> AsyncIterator[ObjectStore]:
    """SeaweedFS (``weed mini``) in a temporary folder, with an empty bucket; stopped afterwards."""
    root = Path(tempfile.mkdtemp(prefix="imagebus-bench-s3-"))
    server = start_s3_server(
        root / "data", access_key="bench", secret_key=secrets.token_urlsafe(24), log_path=root / "weed.log"
    )
    try:
        store = ObjectStore(S3Config(server.endpoint, server.access_key, server.secret_key, bucket="bench"))
        await store.ensure_bucket()
        yield store
    finally:
        server.stop(grace_s=3.0)


async def seconds_through_worker(backend: Backend, store: ObjectStore, jobs: list[GenerationParams]) -> float:
    """Seconds from the first publish until the last JobSucceeded, one Worker on a ``memory://`` bus."""
    bus = await connect_bus(f"memory://{uuid.uuid4().hex}", BusOptions(namespace=f"bench{uuid.uuid4().hex[:8]}"))
    worker = Worker(bus, store, backend, WorkerOptions(worker_id="bench", heartbeat_interval_s=5.0))
    commands = [
        GenerateImage(job_id=job_id, message_id=job_id, owner="bench", backend=backend.name, params=params)
        for job_id, params in ((uuid.uuid4().hex, params) for params in jobs)
    ]
    try:
        async with bus.watch_events() as live:
            start = time.perf_counter()
            run = asyncio.create_task(worker.run(idle_timeout_s=0.5))
            for command in commands:
                await bus.publish_command(command)
            finished = 0
            async for event in live:
                if isinstance(event, JobFailed):
                    raise RuntimeError(f"job {event.job_id} failed: {event.error}")
                if isinstance(event, JobSucceeded):
                    finished += 1
                    if finished == len(commands):
                        break
            seconds = time.perf_counter() - start
            await run  # its idle timeout after the last job is not part of the figure
        return seconds
    finally:
        await bus.close()


# What an operator expecting this load would configure: every submit still passes the rate-limit
# and quota checks (their cost is part of the figure), none is refused.
GENEROUS_LIMITS = {
    "IMAGEBUS_INGRESS_RATE_LIMIT_KEY": str(10**9),
    "IMAGEBUS_INGRESS_RATE_LIMIT_IP": str(10**9),
    "IMAGEBUS_INGRESS_QUOTA_ACTIVE_JOBS": str(10**6),
    "IMAGEBUS_INGRESS_QUOTA_DAILY_IMAGES": str(10**9),
    "IMAGEBUS_INGRESS_MAX_QUEUE_DEPTH": str(10**6),
}


@asynccontextmanager
async def ingress_process(
    settings: Mapping[str, str], *, log_prefix: str = "imagebus-bench-ingress-", stop_timeout_s: float = 30
) -> AsyncIterator[tuple[int, int]]:
    """An `imagebus ingress` process with ``settings`` (IMAGEBUS_* variables; none inherited from
    this environment) on a free port: its port and pid once it listens; SIGTERM on the way out."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBUS_")}
    env.update(settings)
    log = tempfile.NamedTemporaryFile(prefix=log_prefix, suffix=".log", delete=False)  # noqa: SIM115
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imagebus", "ingress", "--port", str(port), env=env, stdout=log, stderr=log
    )
    try:
        while not port_open(port):
            if process.returncode is not None:
                raise RuntimeError(f"imagebus ingress exited with {process.returncode}; see {log.name}")
            await asyncio.sleep(0.1)
        yield port, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), stop_timeout_s)
        log.close()


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used so far; 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # Fields after the command name (which may hold spaces) start at field 3: utime is 14, stime 15.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def syscalls(pid: int) -> tuple[int, int]:
    """Read-like and write-like system calls a process has made so far (/proc/<pid>/io's syscr and
    syscw: socket sends and receives count here); (0, 0) once it is gone or when unreadable."""
    try:
        fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    except (OSError, ValueError):
        return 0, 0
    return int(fields["syscr"]), int(fields["syscw"])


def children(pid: int) -> list[int]:
    """The direct children of a process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(children(current))
    return tree


class CpuMeter:
    """CPU seconds of named groups of processes between ``start()`` and ``stop()``, and the read and
    write system calls they made (``calls``: name -> (reads, writes)): whether a process's CPU goes
    to the kernel's socket work or to its own code."""

    def __init__(self, groups: Mapping[str, Iterable[int]]) -> None:
        self.groups = {name: list(pids) for name, pids in groups.items()}
        self._before: dict[int, float] = {}
        self._calls_before: dict[int, tuple[int, int]] = {}
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, tuple[int, int]] = {}

    def start(self) -> None:
        pids = [pid for pids in self.groups.values() for pid in pids]
        self._calls_before = {pid: syscalls(pid) for pid in pids}
        self._before = {pid: cpu_seconds(pid) for pid in pids}

    def stop(self) -> dict[str, float]:
        self.seconds = {
            name: sum(max(0.0, cpu_seconds(pid) - self._before[pid]) for pid in pids)
            for name, pids in self.groups.items()
        }
        made = {pid: [max(0, n - b) for n, b in zip(syscalls(pid), before, strict=True)]
                for pid, before in self._calls_before.items()}  # fmt: skip
        self.calls = {
            name: (sum(made[pid][0] for pid in pids), sum(made[pid][1] for pid in pids))
            for name, pids in self.groups.items()
        }
        return self.seconds


class EmbeddedStack:
    """`imagebus up` in a temporary data dir, started as bench/overhead.py starts it.

    ``env`` is added to a copy of this process's environment without its ``IMAGEBUS_*`` names, so
    a developer's shell settings do not leak into the figures. ``roles()`` names the processes the
    launcher started (nats, s3, ingress, projector, reaper, worker-<backend>), for CPU accounting.
    """

    def __init__(self, args: list[str], env: dict[str, str] | None = None, start_timeout_s: float = 300.0) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="imagebus-bench-"))
        self.port = free_port()
        environment = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBUS_")} | (env or {})
        argv = ["up", "--port", str(self.port), "--data-dir", str(self.data_dir), *args]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imagebus", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=environment,
        )
        # Read on a thread: the launcher keeps writing after its banner, and a full pipe would block it.
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.output: deque[str] = deque(maxlen=200)
        threading.Thread(target=self._read_output, daemon=True).start()
        self.api_key = self._wait_for_key(start_timeout_s)
        settings = dict(line.strip().split("=", 1) for line in (self.data_dir / "env").read_text().splitlines())
        self.bus_url = settings["IMAGEBUS_BUS_URL"]
        self.base_url = f"http://127.0.0.1:{self.port}"

    def _read_output(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line.rstrip())
            self._lines.put(line)
        self._lines.put(None)

    def _wait_for_key(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            if line.startswith("API key: "):
                return line.split()[2]
        self.stop()
        raise RuntimeError("imagebus up did not start:\n" + "\n".join(self.output))

    def roles(self) -> dict[str, int]:
        """Role name -> pid of every process the launcher runs now."""
        named: dict[str, int] = {}
        for pid in children(self.process.pid):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            name = _role_name(argv)
            suffix = 2
            while name in named:
                name, suffix = f"{name.rsplit('#', 1)[0]}#{suffix}", suffix + 1
            named[name] = pid
        return named

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _role_name(argv: list[str]) -> str:
    program = Path(argv[0]).name
    if program.startswith("nats-server"):
        return "nats-server"
    if program.startswith("weed"):
        return "weed (S3)"
    if "imagebus" in argv:
        rest = argv[argv.index("imagebus") + 1 :]
        if rest and rest[0] == "worker" and "--backend" in rest:
            return f"worker-{rest[rest.index('--backend') + 1]}"
        if rest:
            return rest[0]
    return program


class RawHttp:
    """One HTTP/1.1 keep-alive connection and no more than the benches need: httpx spends several
    times its CPU per request, and the client shares the cores with the servers it measures."""

    def __init__(self, host: str, port: int, api_key: str | None = None) -> None:
        self.host, self.port = host, port
        key = f"X-API-Key: {api_key}\r\n" if api_key else ""
        self._head = f"Host: {host}:{port}\r\n{key}Content-Type: application/json\r\n"
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        status, headers = await self._send(method, path, body)
        if "content-length" in headers:
            content = await self._readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            content = b"".join([chunk async for chunk in self._chunks()])
        else:
            raise RuntimeError(f"{method} {path}: an answer without a length")
        self._close_if_asked(headers)
        return status, content

    async def json(self, method: str, path: str, body: bytes = b"", expect: int = 200) -> dict[str, Any]:
        status, content = await self.request(method, path, body)
        if status != expect:
            raise RuntimeError(f"{method} {path} answered {status}: {content[:300]!r}")
        answer: dict[str, Any] = json.loads(content)
        return answer

    async def events(self, path: str) -> AsyncIterator[dict[str, Any]]:
        """The ``data:`` payloads of a Server-Sent Events stream, until the server ends it."""
        status, headers = await self._send("GET", path, b"")
        if status != 200 or headers.get("transfer-encoding") != "chunked":
            raise RuntimeError(f"GET {path} answered {status}")
        pending = b""
        async for chunk in self._chunks():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.startswith(b"data:"):
                    yield json.loads(line[5:])
        self._close_if_asked(headers)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

    async def _send(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, str]]:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        self._writer.write(
            f"{method} {path} HTTP/1.1\r\n{self._head}Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        head = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in head[1:] if line)}
        return int(head[0].split()[1]), headers

    async def _readexactly(self, size: int) -> bytes:
        assert self._reader is not None
        return await self._reader.readexactly(size)

    async def _chunks(self) -> AsyncIterator[bytes]:
        assert self._reader is not None
        while size := int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16):
            yield await self._reader.readexactly(size)
            await self._reader.readexactly(2)
        await self._reader.readuntil(b"\r\n")

    def _close_if_asked(self, headers: dict[str, str]) -> None:
        if headers.get("connection", "").lower() == "close" and self._writer is not None:
            self._writer.close()
