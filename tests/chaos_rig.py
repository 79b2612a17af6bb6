"""What the chaos tests (tests/test_chaos.py) and the long run (bench/chaos.py) share.

Worker processes that are SIGKILLed and replaced at will, brokers of our own that crash or stop
and come back on the same port and data (so restarting one disturbs no one else's broker), and the
audit of a batch afterwards: the event log against the read model as the API shows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bus import Bus, BusOptions
from imagebus.nats_server import start_nats
from imagebus.process import ManagedProcess, free_port, port_open
from schemas import Event, ImageStored, JobCanceled, JobFailed, JobStarted, JobSucceeded, image_id_for
from storage.object_store import S3Config

TERMINAL_EVENTS = (JobSucceeded, JobFailed, JobCanceled)
TERMINAL_STATUSES = frozenset({"completed", "failed", "canceled"})
_PAGE = 50


# --- role processes ---------------------------------------------------------------------------


def role_env(bus_url: str, options: BusOptions, s3: S3Config, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of an ``imagebus <role>`` process on this bus and object store."""
    return {
        "IMAGEBUS_BUS_URL": bus_url,
        "IMAGEBUS_BUS_NAMESPACE": options.namespace,
        "IMAGEBUS_ACK_WAIT_S": str(options.ack_wait_s),
        "IMAGEBUS_MAX_DELIVERIES": str(options.max_deliveries),
        "IMAGEBUS_S3_ENDPOINT": s3.endpoint,
        "IMAGEBUS_S3_ACCESS_KEY": s3.access_key,
        "IMAGEBUS_S3_SECRET_KEY": s3.secret_key,
        "IMAGEBUS_S3_BUCKET": s3.bucket,
        "IMAGEBUS_LOG_FORMAT": "json",
        **(extra or {}),
    }


def start_role(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> ManagedProcess:
    return ManagedProcess(
        name=name, argv=[sys.executable, "-m", "imagebus", *argv], log_path=log_dir / f"{name}.log", env=env
    ).start()


def logged(process: ManagedProcess, event: str) -> bool:
    """Whether the process's log has a line for ``event`` (its structlog event name)."""
    try:
        return f'"{event}"' in process.log_path.read_text(errors="replace")
    except FileNotFoundError:
        return False


async def wait_logged(process: ManagedProcess, event: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not logged(process, event):
        if not process.alive():
            raise RuntimeError(f"{process.name} exited before {event}:\n{process.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{process.name}: no {event} after {timeout_s:.0f} s:\n{process.tail()}")
        await asyncio.sleep(0.1)


@dataclass
class WorkerPool:
    """``size`` worker processes; any one can be SIGKILLed, and a fresh one takes its place at once.

    Every process gets a worker id of its own (``w<slot>-<n>``), so JobStarted tells them apart.
    """

    env: dict[str, str]
    log_dir: Path
    size: int = 2
    kills: int = 0
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    _slots: dict[int, str] = field(default_factory=dict)
    _killed: set[str] = field(default_factory=set)

    def start(self) -> WorkerPool:
        for slot in range(self.size):
            self._start(slot)
        return self

    def _start(self, slot: int) -> None:
        worker_id = f"w{slot}-{len(self.processes) + 1}"
        env = {**self.env, "IMAGEBUS_WORKER_WORKER_ID": worker_id}
        self.processes[worker_id] = start_role(worker_id, ["worker"], env, self.log_dir)
        self._slots[slot] = worker_id

    def current(self) -> dict[str, ManagedProcess]:
        """The processes now in the pool, by worker id."""
        return {worker_id: self.processes[worker_id] for worker_id in self._slots.values()}

    def ready(self) -> set[str]:
        """Worker ids of the current processes that are taking work."""
        return {worker_id for worker_id, process in self.current().items() if logged(process, "worker_ready")}

    def kill_and_replace(self, worker_id: str) -> None:
        """SIGKILL the worker (no drain, no ack, no goodbye) and start a fresh one in its slot."""
        slot = next(slot for slot, current in self._slots.items() if current == worker_id)
        self._killed.add(worker_id)  # before the kill: it may run in a thread while others look
        self.processes[worker_id].kill()
        self.kills += 1
        self._start(slot)

    def died_on_their_own(self) -> list[str]:
        """Current processes that exited without being killed (a crash, not chaos)."""
        return [
            worker_id
            for worker_id, process in self.current().items()
            if worker_id not in self._killed and not process.alive()
        ]

    def raise_if_any_crashed(self) -> None:
        crashed = self.died_on_their_own()
        if crashed:
            raise AssertionError(f"workers exited on their own: {crashed}\n{self.tails()}")

    def stop(self, grace_s: float = 20.0) -> dict[str, int | None]:
        return {worker_id: process.stop(grace_s) for worker_id, process in self.current().items()}

    def kill_all(self) -> None:
        for process in self.processes.values():
            process.kill()

    def tails(self, lines: int = 15) -> str:
        return "\n".join(f"--- {worker_id}\n{process.tail(lines)}" for worker_id, process in self.processes.items())


class RunningJobs:
    """Which worker runs which job, followed from live events (JobStarted names the worker)."""

    def __init__(self) -> None:
        self._worker_of: dict[str, str] = {}

    def see(self, event: Event) -> None:
        if isinstance(event, JobStarted):
            self._worker_of[event.job_id] = event.worker_id
        elif isinstance(event, TERMINAL_EVENTS):
            self._worker_of.pop(event.job_id, None)

    def busy_workers(self) -> set[str]:
        return set(self._worker_of.values())

    async def follow(self, bus: Bus) -> None:
        async with bus.watch_events() as live:
            async for event in live:
                self.see(event)


async def kill_workers(
    pool: WorkerPool,
    running: RunningJobs,
    rng: random.Random,
    *,
    kills: int,
    every_s: tuple[float, float],
    until: asyncio.Event,
) -> None:
    """Every ``every_s`` seconds (uniformly drawn) SIGKILL a worker that is running a job, until
    ``kills`` were made or ``until`` is set. Only ready workers are chosen, so each kill lands on
    one that took work, not on one still loading its model."""
    while pool.kills < kills and not until.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until.wait(), rng.uniform(*every_s))
        while not until.is_set():
            victims = sorted(pool.ready() & running.busy_workers())
            if victims:
                await asyncio.to_thread(pool.kill_and_replace, rng.choice(victims))
                break
            await asyncio.sleep(0.1)


# --- brokers ----------------------------------------------------------------------------------


class NatsBroker:
    """A nats-server of our own that crashes (SIGKILL) or stops, and comes back on the same port and store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.restarts = 0
        self._process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsBroker:
        self._process = start_nats(self.root / "store", self.port, self.root / "nats.log")
        return self

    def down(self, *, crash: bool) -> None:
        assert self._process is not None
        if crash:
            self._process.kill()
        else:
            self._process.stop(grace_s=10)

    async def restart(self, down_s: float, *, crash: bool = True) -> None:
        await asyncio.to_thread(self.down, crash=crash)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(self.start)
        self.restarts += 1

    def close(self) -> None:
        if self._process is not None:
            self._process.stop(grace_s=5)


def _rabbitmq_bin(name: str) -> str:
    # The scripts themselves, not /usr/sbin's wrappers, which switch to the rabbitmq user (and its cookie).
    for folder in ("/usr/lib/rabbitmq/bin", "/usr/local/lib/rabbitmq/bin"):
        if os.path.exists(f"{folder}/{name}"):
            return f"{folder}/{name}"
    found = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    if found is None:
        raise FileNotFoundError(f"{name} not found: the RabbitMQ chaos tests start a RabbitMQ node of their own")
    return os.path.realpath(found)


class RabbitNode:
    """A RabbitMQ node of our own: its own AMQP and distribution ports, data folder and Erlang cookie.

    Stopping it takes down no one else's connections (the machine's broker, shared by other tests,
    is left alone). Quorum queues and streams live in its data folder and survive a restart.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.node = f"imagebus-chaos-{uuid.uuid4().hex[:8]}@localhost"
        self.restarts = 0
        self._dist_port = free_port()
        self._process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        return {
            # The node writes its Erlang cookie under HOME; rabbitmqctl reads it from there.
            "HOME": str(self.root),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(self._dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.root / "rabbitmq.pid"),
            # Not the machine's rabbitmq-env.conf, which names the machine's node.
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
        }

    def ctl(self, *args: str, timeout_s: float = 60.0) -> None:
        result = subprocess.run(
            [_rabbitmq_bin("rabbitmqctl"), "-n", self.node, *args],
            env={**os.environ, **self._env()},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")

    def start(self, timeout_s: float = 90.0) -> RabbitNode:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        self._process = ManagedProcess(
            name="rabbitmq",
            argv=[_rabbitmq_bin("rabbitmq-server")],
            log_path=self.root / "rabbitmq.out",
            env=self._env(),
            cwd=self.root,
        ).start()
        deadline = time.monotonic() + timeout_s
        while not port_open(self.port):
            if not self._process.alive():
                raise RuntimeError(f"rabbitmq-server exited during start-up:\n{self._process.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ not listening on {self.port} after {timeout_s:.0f} s")
            time.sleep(0.1)
        self.ctl("await_startup", timeout_s=timeout_s)
        return self

    def down(self, *, crash: bool) -> None:
        if crash:
            self.crash()
        else:
            self.stop()

    def stop(self) -> None:
        """A clean shutdown (what `systemctl stop` does): queues are closed and written out."""
        if self._process is None or not self._process.alive():
            return
        self.ctl("stop")
        self._wait_exit(60)

    def crash(self) -> None:
        """SIGKILL the whole node (the Erlang VM and the script around it): no shutdown at all."""
        if self._process is None or not self._process.alive():
            return
        os.killpg(self._process.pid, signal.SIGKILL)
        self._wait_exit(30)

    def _wait_exit(self, timeout_s: float) -> None:
        assert self._process is not None and self._process.process is not None
        self._process.process.wait(timeout=timeout_s)

    async def restart(self, down_s: float, *, crash: bool = False) -> None:
        await asyncio.to_thread(self.down, crash=crash)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(self.start)
        self.restarts += 1

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        if self._process is not None and self._process.alive():
            self.crash()


# --- the batch and its audit ------------------------------------------------------------------


@dataclass(frozen=True)
class Submitted:
    job_id: str
    num_images: int


async def submit(client: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any]) -> Submitted:
    response = await client.post("/api/generate", json=body, headers=headers)
    assert response.status_code == 202, (response.status_code, response.text)
    return Submitted(response.json()["job_id"], int(body.get("num_images", 1)))


async def listed(client: httpx.AsyncClient, headers: dict[str, str], path: str, key: str) -> list[dict[str, Any]]:
    """Every item of a paginated listing (``/api/jobs``, ``/api/gallery``)."""
    items: list[dict[str, Any]] = []
    page = 1
    while True:
        response = await client.get(path, params={"page": page, "limit": _PAGE}, headers=headers)
        assert response.status_code == 200, (path, response.status_code, response.text)
        body = response.json()
        items += body[key]
        if page * _PAGE >= body["total"]:
            return items
        page += 1


async def wait_until_terminal(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    job_ids: Iterable[str],
    *,
    timeout_s: float,
    check: Callable[[], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """The job views once every one of ``job_ids`` is terminal; TimeoutError naming the others.

    ``check`` runs between polls and may raise to give up early (a process that crashed)."""
    wanted = set(job_ids)
    deadline = time.monotonic() + timeout_s
    while True:
        if check is not None:
            check()
        views = {job["id"]: job for job in await listed(client, headers, "/api/jobs", "jobs") if job["id"] in wanted}
        open_jobs = {job_id: views[job_id]["status"] if job_id in views else "absent" for job_id in wanted}
        open_jobs = {job_id: status for job_id, status in open_jobs.items() if status not in TERMINAL_STATUSES}
        if not open_jobs:
            return views
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(open_jobs)} jobs not terminal after {timeout_s:.0f} s: {open_jobs}")
        await asyncio.sleep(0.5)


@dataclass
class LogFacts:
    """What the durable event log says about a batch."""

    terminal_events: Counter[str] = field(default_factory=Counter)
    attempts: dict[str, int] = field(default_factory=dict)
    stored_images: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    @classmethod
    async def read(cls, bus: Bus) -> LogFacts:
        facts = cls()
        async with bus.read_events(idle_timeout_s=1.0) as events:
            async for logged_event in events:
                event = logged_event.event
                if isinstance(event, TERMINAL_EVENTS):
                    facts.terminal_events[event.job_id] += 1
                elif isinstance(event, JobStarted):
                    facts.attempts[event.job_id] = max(event.attempt, facts.attempts.get(event.job_id, 0))
                elif isinstance(event, ImageStored):
                    facts.stored_images[event.job_id].add(event.image_id)
        return facts


@dataclass
class ChaosFigures:
    """The figures docs/reliability.md reports; the tests hold the ones that must be zero at zero."""

    jobs_submitted: int = 0
    worker_kills: int = 0
    broker_restarts: int = 0
    # Accepted (202) jobs that never reached a terminal state, or are missing from the read model.
    jobs_lost: int = 0
    # Jobs that ended otherwise than completed, with all their images.
    jobs_not_completed: int = 0
    # Image ids shown that are not a job's deterministic ones, or shown twice.
    duplicates_visible: int = 0
    # The highest JobStarted.attempt of any job: how often the worst-hit job was delivered.
    max_deliveries_seen: int = 0
    # Terminal events in the log for the job with the most (1 unless a second result got through).
    terminal_events_max: int = 0
    # Jobs whose log has more than one terminal event (a worker killed between result and ack).
    jobs_with_repeated_terminal_event: int = 0
    # Submits answered 503 while the broker was down (they queued nothing and said so).
    submits_refused: int = 0
    wall_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            f"jobs submitted                  {self.jobs_submitted}",
            f"worker kills (SIGKILL)          {self.worker_kills}",
            f"broker restarts                 {self.broker_restarts}",
            f"jobs lost                       {self.jobs_lost}",
            f"jobs not completed              {self.jobs_not_completed}",
            f"duplicates visible              {self.duplicates_visible}",
            f"max deliveries seen             {self.max_deliveries_seen}",
            f"terminal events per job (max)   {self.terminal_events_max}",
            f"jobs with a repeated terminal   {self.jobs_with_repeated_terminal_event}",
            f"submits refused (503) in outage {self.submits_refused}",
            f"wall time                       {self.wall_s:.1f} s",
        ]


async def audit(
    bus: Bus, client: httpx.AsyncClient, headers: dict[str, str], jobs: list[Submitted], figures: ChaosFigures
) -> ChaosFigures:
    """Compare the batch with the log and with what the API shows; fills ``figures`` in."""
    facts = await LogFacts.read(bus)
    views = {job["id"]: job for job in await listed(client, headers, "/api/jobs", "jobs")}
    gallery = [image["id"] for image in await listed(client, headers, "/api/gallery", "images")]
    expected = {job.job_id: {image_id_for(job.job_id, i) for i in range(job.num_images)} for job in jobs}
    figures.jobs_submitted = len(jobs)
    for job in jobs:
        view = views.get(job.job_id)
        if view is None or view["status"] not in TERMINAL_STATUSES:
            figures.jobs_lost += 1
            figures.problems.append(f"{job.job_id}: {'absent' if view is None else view['status']}")
            continue
        shown = [image["id"] for image in view["images"]]
        if view["status"] != "completed" or set(shown) != expected[job.job_id]:
            figures.jobs_not_completed += 1
            figures.problems.append(f"{job.job_id}: {view['status']} with {len(shown)} images ({view.get('error')})")
        figures.duplicates_visible += len(shown) - len(set(shown)) + len(set(shown) - expected[job.job_id])
        stray = facts.stored_images[job.job_id] - expected[job.job_id]
        if stray:
            figures.problems.append(f"{job.job_id}: stored images outside its deterministic ids: {sorted(stray)}")
    every_expected = set().union(*expected.values()) if expected else set()
    figures.duplicates_visible += len(gallery) - len(set(gallery)) + len(set(gallery) - every_expected)
    figures.max_deliveries_seen = max((facts.attempts.get(job.job_id, 0) for job in jobs), default=0)
    counts = [facts.terminal_events[job.job_id] for job in jobs]
    figures.terminal_events_max = max(counts, default=0)
    figures.jobs_with_repeated_terminal_event = sum(1 for count in counts if count > 1)
    return figures
