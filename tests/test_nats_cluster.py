"""IMAGEBUS_BUS_REPLICAS on a real 3-server JetStream cluster (the Kubernetes NATS overlay): the
app creates its streams with 3 copies, raises streams that already exist with fewer, and leaves
an existing stream alone when the setting is unset."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import nats
import pytest

from bus import BusOptions, connect_bus
from bus._names import NatsNames
from imagebus.process import ManagedProcess, find_binary, free_port, port_open


@pytest.fixture(scope="module")
async def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    root = tmp_path_factory.mktemp("nats-cluster")
    client_ports = [free_port() for _ in range(3)]
    route_ports = [free_port() for _ in range(3)]
    routes = ", ".join(f"nats://127.0.0.1:{port}" for port in route_ports)
    servers = []
    try:
        for index, (client_port, route_port) in enumerate(zip(client_ports, route_ports, strict=True)):
            conf = root / f"n{index}.conf"
            conf.write_text(
                f'server_name: "n{index}"\nlisten: "127.0.0.1:{client_port}"\n'
                f'jetstream {{ store_dir: "{root / f"store{index}"}" }}\n'
                f'cluster {{ name: "c", listen: "127.0.0.1:{route_port}", routes: [{routes}] }}\n'
            )
            argv = [find_binary("nats-server"), "-c", str(conf)]
            servers.append(ManagedProcess(f"n{index}", argv, root / f"n{index}.log").start())
        # One server's URL: the client learns the others from it, as a role does from the Service.
        url = f"nats://127.0.0.1:{client_ports[0]}"
        await _until_jetstream_answers(url, client_ports, servers)
        yield url
    finally:
        for server in servers:
            server.stop(grace_s=5)


async def _until_jetstream_answers(
    url: str, ports: list[int], servers: list[ManagedProcess], timeout_s: float = 30
) -> None:
    """The cluster has elected a meta leader once the JetStream API answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        if all(port_open(port) for port in ports):
            nc = await nats.connect(url)
            try:
                await nc.jetstream().account_info()
                return
            except Exception:
                pass
            finally:
                await nc.close()
        if time.monotonic() > deadline:
            raise TimeoutError("no JetStream meta leader:\n" + "\n".join(s.tail(10) for s in servers))
        await asyncio.sleep(0.3)


async def _replicas(url: str, streams: list[str]) -> dict[str, int]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        return {name: (await js.stream_info(name)).config.num_replicas or 1 for name in streams}
    finally:
        await nc.close()


async def test_streams_get_the_configured_replicas_and_existing_ones_are_raised(cluster_url: str) -> None:
    options = BusOptions(namespace=f"rep{uuid.uuid4().hex[:8]}")
    names = NatsNames(options.namespace)
    streams = [names.cmd_stream, names.evt_stream, names.dead_stream]

    # Unset: created with one copy each, as on a single server.
    bus = await connect_bus(cluster_url, options)
    await bus.close()
    assert await _replicas(cluster_url, streams) == dict.fromkeys(streams, 1)

    # Set: the existing streams are raised to three copies.
    bus = await connect_bus(cluster_url, replace(options, replicas=3))
    await bus.close()
    assert await _replicas(cluster_url, streams) == dict.fromkeys(streams, 3)

    # Unset again: an existing stream keeps what it has (an operator's choice is not undone).
    bus = await connect_bus(cluster_url, options)
    await bus.close()
    assert await _replicas(cluster_url, streams) == dict.fromkeys(streams, 3)


async def test_a_fresh_namespace_is_created_with_three_copies(cluster_url: str) -> None:
    options = BusOptions(namespace=f"new{uuid.uuid4().hex[:8]}", replicas=3)
    names = NatsNames(options.namespace)
    streams = [names.cmd_stream, names.evt_stream, names.dead_stream]
    bus = await connect_bus(cluster_url, options)
    await bus.close()
    assert await _replicas(cluster_url, streams) == dict.fromkeys(streams, 3)
