"""An in-process imagebus stack for end-to-end tests: real bus, real S3, real database.

Ingress (Litestar test client, lifespan included), one or more workers and the projector run
as tasks in the test's event loop, each with its own bus connection, as separate processes would.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from litestar.testing import AsyncTestClient

from bus import Bus, BusOptions, connect_bus
from imagebus.catalog import load_catalog
from ingress.app import create_app
from ingress.config import IngressConfig, RateLimits
from projector.database import create_database, create_schema
from projector.readside import ReadModel
from projector.service import Projector
from projector.stall_watchdog import run_stall_watchdog
from schemas import Catalog, Event
from storage.object_store import ObjectStore, S3Config
from workers.backends.base import Backend
from workers.runtime import Worker, WorkerOptions

KEY_ALICE = "ib_test_alice_" + uuid.uuid4().hex
KEY_BOB = "ib_test_bob_" + uuid.uuid4().hex
KEY_ADMIN = "ib_test_admin_" + uuid.uuid4().hex


def auth(key: str = KEY_ALICE) -> dict[str, str]:
    return {"X-API-Key": key}


@dataclass
class Stack:
    client: AsyncTestClient[Any]
    config: IngressConfig
    bus: Bus
    store: ObjectStore
    catalog: Catalog
    options: BusOptions
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    async def wait_for_status(
        self, job_id: str, statuses: set[str], *, key: str = KEY_ALICE, timeout_s: float = 60.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            response = await self.client.get(f"/api/jobs/{job_id}", headers=auth(key))
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            if body["status"] in statuses:
                return body
            for task in self.tasks:  # a crashed role should fail the test, not time it out
                if task.done() and task.exception():
                    raise task.exception()  # type: ignore[misc]
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {body['status']} after {timeout_s}s: {body}")
            await asyncio.sleep(0.05)

    async def events_for(self, job_id: str) -> list[Event]:
        async with self.bus.read_events(idle_timeout_s=0.5) as events:
            return [logged.event async for logged in events if logged.event.job_id == job_id]


@asynccontextmanager
async def running_stack(
    bus_url: str,
    s3: S3Config,
    database_url: str,
    backend: Backend,
    *,
    image_ttl_s: float = 600.0,
    workers: int = 1,
    ack_wait_s: float = 30.0,
    max_deliveries: int = 3,
    catalog: Catalog | None = None,
    extra_workers: Sequence[tuple[Backend, str | None]] = (),
    watchdog_stall_after_s: float | None = None,
    **config_overrides: Any,
) -> AsyncIterator[Stack]:
    """``config_overrides`` are IngressConfig fields (allow_anonymous, quota, stall_after_s, ...).

    ``extra_workers``: more workers, each a backend and the queue (catalog pool) it serves.
    ``watchdog_stall_after_s``: run the stall watchdog beside the projector, checking twice a second.
    """
    catalog = catalog or load_catalog()
    options = BusOptions(namespace=f"t{uuid.uuid4().hex[:10]}", ack_wait_s=ack_wait_s, max_deliveries=max_deliveries)
    database = create_database(database_url)
    await create_schema(database)
    store = ObjectStore(s3)
    await store.ensure_bucket()
    config = IngressConfig(
        bus_url=bus_url,
        bus_options=options,
        s3=s3,
        database_url=database_url,
        catalog=catalog,
        api_keys=(KEY_ALICE, KEY_BOB),
        key_secret="test-secret",
        admin_keys=(KEY_ADMIN,),
        # Off unless a test asks: the others poll as fast as they like.
        **{"rate_limits": RateLimits(requests_per_key=0, requests_per_ip=0), **config_overrides},
    )
    app = create_app(config)
    stop = asyncio.Event()
    buses: list[Bus] = []
    tasks: list[asyncio.Task[Any]] = []

    async def connect() -> Bus:
        bus = await connect_bus(bus_url, options)
        buses.append(bus)
        return bus

    try:
        projector = Projector(database, await connect())
        tasks.append(asyncio.create_task(projector.run(stop=stop)))
        if watchdog_stall_after_s is not None:
            watchdog = run_stall_watchdog(
                await connect(),
                ReadModel(database),
                projector.fresh_as_of,
                stall_after_s=watchdog_stall_after_s,
                interval_s=0.5,
                stop=stop,
            )
            tasks.append(asyncio.create_task(watchdog))
        for index in range(workers):
            worker = Worker(
                await connect(),
                store,
                backend,
                WorkerOptions(worker_id=f"test-worker-{index}", image_ttl_s=image_ttl_s, max_deliveries=max_deliveries),
            )
            tasks.append(asyncio.create_task(worker.run(stop=stop)))
        for index, (extra, queue) in enumerate(extra_workers):
            worker = Worker(
                await connect(),
                store,
                extra,
                WorkerOptions(
                    worker_id=f"extra-worker-{index}",
                    image_ttl_s=image_ttl_s,
                    max_deliveries=max_deliveries,
                    queue=queue,
                ),
            )
            tasks.append(asyncio.create_task(worker.run(stop=stop)))
        async with AsyncTestClient(app) as client:
            yield Stack(
                client=client,
                config=config,
                bus=await connect(),
                store=store,
                catalog=catalog,
                options=options,
                tasks=tasks,
            )
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        for bus in buses:
            await bus.close()
        await database.dispose()


def assert_json_error(response: Any, *codes: int) -> dict[str, Any]:
    """A JSON error answer with one of ``codes`` (the seed dialects name it ``message`` or ``error``)."""
    assert response.status_code in codes, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body: dict[str, Any] = response.json()
    assert isinstance(body.get("message") or body.get("error"), str), body
    return body


async def fetch(url: str) -> httpx.Response:
    """GET a URL outside the API (a presigned object-store URL)."""
    async with httpx.AsyncClient() as client:
        return await client.get(url)


@asynccontextmanager
async def served(config: IngressConfig) -> AsyncIterator[httpx.AsyncClient]:
    """Another ingress replica over real HTTP, in this event loop (streams arrive as they are sent)."""
    import uvicorn

    from imagebus.process import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
    finally:
        server.should_exit = True
        await task
