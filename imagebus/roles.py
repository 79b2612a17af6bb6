"""Each role's main loop, built from its settings. The CLI picks one; ``imagebus up`` runs them all."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from minio import Minio
from pydantic import SecretStr

from bus import Bus, BusOptions, connect_bus
from imagebus.catalog import load_catalog
from imagebus.observability import metrics_endpoint
from imagebus.readiness import report_ready, withdraw_ready
from imagebus.settings import (
    IngressSettings,
    ProjectorSettings,
    ReaperSettings,
    WorkerSettings,
    _BusMixin,
    _S3Mixin,
)
from ingress.config import EnrichConfig, IngressConfig, QuotaLimits, RateLimits
from schemas import Catalog
from storage.object_store import ObjectStore, S3Config, s3_client
from workers.backends.base import Backend

if TYPE_CHECKING:
    from workers.runtime import WorkerOptions

log = structlog.get_logger(__name__)

# Seconds a SIGTERMed ingress gives its requests in flight (event streams are cut after it).
INGRESS_SHUTDOWN_GRACE_S = 10
# How long a role that starts before its object store waits for it (as the bus does for its broker).
STORE_PATIENCE_S = 30.0
_STORE_RETRY_S = 0.5


def bus_options(settings: _BusMixin) -> BusOptions:
    return BusOptions(
        namespace=settings.bus_namespace,
        ack_wait_s=settings.ack_wait_s,
        max_deliveries=settings.max_deliveries,
        event_retention_s=settings.event_retention_s,
        replicas=settings.bus_replicas,
    )


def s3_config(settings: _S3Mixin) -> S3Config:
    return S3Config(
        endpoint=settings.s3_endpoint,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key.get_secret_value(),
        bucket=settings.s3_bucket,
        secure=settings.s3_secure,
        region=settings.s3_region,
        public_endpoint=settings.s3_public_endpoint,
    )


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT: the role drains and returns."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


@dataclass(frozen=True)
class LoadedCatalog:
    catalog: Catalog
    # Preview images of scanned LoRAs (file paths or s3:// objects), by LoRA id.
    lora_previews: dict[str, str]
    # A client for the LoRA bucket, when LoRAs live in one.
    lora_s3: Minio | None


def load_role_catalog(settings: IngressSettings | WorkerSettings) -> LoadedCatalog:
    """The catalog file plus the LoRAs found in the LoRA folder and bucket (inline entries win)."""
    from imagebus.lora_catalog import LoraScan, merge_loras, scan_lora_bucket, scan_lora_folder

    catalog = load_catalog(settings.catalog_path, settings.default_model)
    scan = LoraScan()
    client = s3_client(s3_config(settings)) if settings.lora_bucket else None
    if settings.lora_dir is not None:
        scan = scan.plus(scan_lora_folder(settings.lora_dir))
    if settings.lora_bucket and client is not None:
        bucket, _, prefix = settings.lora_bucket.partition("/")
        scan = scan.plus(scan_lora_bucket(client, bucket, prefix))
    catalog = merge_loras(catalog, scan.loras)
    return LoadedCatalog(catalog, scan.previews_in(catalog), client)


async def _connect(settings: _BusMixin) -> Bus:
    return await connect_bus(settings.bus_url, bus_options(settings))


def build_backend(name: str, loaded: LoadedCatalog, settings: WorkerSettings) -> Backend:
    """The backend a worker runs, restricted to its pool's models when it serves a pool."""
    catalog = loaded.catalog
    queue = settings.pool or name
    served = [spec.id for spec in catalog.models_in(queue)]
    if settings.pool is not None and not served:
        raise SystemExit(f"pool {settings.pool!r} has no models in the catalog")
    if any(catalog.models[model].backend != name for model in served):
        raise SystemExit(f"pool {queue!r} belongs to another backend than {name!r}")
    if name == "diffusers":
        from workers.backends.diffusers import DiffusersBackend, DiffusersOptions, default_lora_cache_dir
        from workers.backends.lora_files import LoraFiles

        lora_cache = settings.lora_cache_dir or default_lora_cache_dir()

        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)

        return DiffusersBackend(
            loaded.catalog,
            DiffusersOptions(
                device=settings.device,
                dtype=settings.dtype,
                preview_interval_s=settings.preview_interval_s,
                cache_budget_gb=settings.cache_budget_gb,
                max_loaded_models=settings.max_loaded_models,
                max_batch_images=settings.max_batch_images,
                models=served if settings.pool is not None else None,
                cpu_offload=settings.cpu_offload,
            ),
            lora_files=LoraFiles(lora_cache, loaded.lora_s3),
        )
    if name == "remote":
        from workers.backends.remote import RemoteBackend

        tokens = {endpoint: token.get_secret_value() for endpoint, token in settings.remote_tokens.items()}
        return RemoteBackend(catalog, tokens, concurrency=settings.remote_concurrency)
    if name == "browser":
        from imagebus.sites import SITES_DIR
        from workers.backends.browser import BrowserBackend, load_site_profiles

        return BrowserBackend.from_catalog(
            catalog,
            load_site_profiles(settings.sites_dir or SITES_DIR),
            models=served,
            executable_path=settings.browser_executable,
            pages=settings.browser_pages,
            storage_state_dir=settings.storage_state_dir,
            headless=settings.headless,
            launch_args=settings.browser_args,
        )
    raise SystemExit(f"unknown backend {name!r}; available: diffusers, remote, browser")


def preload_models(catalog: Catalog, settings: WorkerSettings) -> list[str]:
    """A pool's models (its reason to exist), else the catalog default if it is this backend's."""
    if settings.pool is not None:
        return [spec.id for spec in catalog.models_in(settings.pool)]
    default = catalog.get(None)
    return [default.id] if default is not None and default.queue == settings.backend else []


def worker_options(settings: WorkerSettings) -> WorkerOptions:
    """The runtime's options from the role's settings."""
    from workers.encoding import ImageFormat
    from workers.runtime import WorkerOptions

    return WorkerOptions(
        worker_id=settings.worker_id or f"{socket.gethostname()}-{os.getpid()}",
        image_ttl_s=settings.image_ttl_s,
        heartbeat_interval_s=max(settings.ack_wait_s / 3, 0.5),
        heartbeat_event_interval_s=settings.heartbeat_event_interval_s,
        max_deliveries=settings.max_deliveries,
        shutdown_grace_s=settings.shutdown_grace_s,
        queue=settings.pool,
        batch_linger_s=settings.batch_linger_s,
        batch_burst_gap_s=settings.batch_burst_gap_s,
        image_format=ImageFormat(settings.image_format, settings.image_quality, settings.png_compress_level),
        spans=bool(settings.otlp_endpoint),  # a span no exporter takes is pure cost
    )


async def run_worker(settings: WorkerSettings) -> None:
    from workers.runtime import Worker

    loaded = load_role_catalog(settings)
    catalog = loaded.catalog
    backend = build_backend(settings.backend, loaded, settings)
    store = ObjectStore(s3_config(settings))
    bus = await _connect(settings)
    options = worker_options(settings)
    worker_id = options.worker_id
    worker = Worker(bus, store, backend, options)
    try:
        stop = stop_on_signals()
        async with metrics_endpoint(settings.metrics_host, settings.metrics_port):
            models = preload_models(catalog, settings) if settings.preload else []
            # The model load is most of a cold start; the store may still be starting meanwhile
            # (`imagebus up` starts the workers beside the S3 server), so both at once.
            async with asyncio.TaskGroup() as starting:
                starting.create_task(worker.prepare(models))
                starting.create_task(ensure_bucket_patiently(store))
            queue = settings.pool or settings.backend
            log.info("worker_ready", worker_id=worker_id, backend=settings.backend, queue=queue, models=models)
            # Commands wait in the work queue, so a job sent from now on is taken as soon as run()
            # subscribes, its model already loaded.
            report_ready(settings.ready_file, role="worker", backend=settings.backend, queue=queue, models=models)
            try:
                await worker.run(stop=stop)
            finally:
                withdraw_ready(settings.ready_file)
    finally:
        await bus.close()


async def ensure_bucket_patiently(store: ObjectStore, *, patience_s: float = STORE_PATIENCE_S) -> None:
    """The store's bucket, tried again every half second for ``patience_s`` while the store does not
    answer (or answers before it has loaded its identities, as a starting SeaweedFS does)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience_s
    while True:
        try:
            await store.ensure_bucket()
            return
        except Exception as error:  # the S3 SDK's connection, HTTP and S3 errors alike
            if loop.time() + _STORE_RETRY_S > deadline:
                raise
            log.warning("store_unreachable", error=str(error)[:300], retry_in_s=_STORE_RETRY_S)
            await asyncio.sleep(_STORE_RETRY_S)


async def run_projector(settings: ProjectorSettings, *, rebuild_first: bool = False) -> None:
    from projector.database import create_database, create_schema
    from projector.readside import ReadModel
    from projector.service import Projector, rebuild
    from projector.stall_watchdog import run_stall_watchdog

    database = create_database(
        settings.database_url, pool_size=settings.database_pool_size, pool_overflow=settings.database_pool_overflow
    )
    bus = await _connect(settings)
    try:
        stop = stop_on_signals()
        if rebuild_first:
            count = await rebuild(database, bus, name=settings.name)
            log.info("projector_rebuilt", events=count)
        await create_schema(database)
        log.info("projector_ready")
        report_ready(settings.ready_file, role="projector")
        projector = Projector(
            database,
            bus,
            name=settings.name,
            batch_size=settings.batch_size,
            batch_wait_s=settings.batch_wait_s,
            batch_gap_s=settings.batch_gap_s,
            spans=bool(settings.otlp_endpoint),  # a span no exporter takes is pure cost
        )
        async with metrics_endpoint(settings.metrics_host, settings.metrics_port), asyncio.TaskGroup() as roles:
            if settings.stall_after_s > 0:
                roles.create_task(
                    run_stall_watchdog(
                        bus,
                        ReadModel(database),
                        projector.fresh_as_of,
                        stall_after_s=settings.stall_after_s,
                        interval_s=settings.stall_check_interval_s,
                        stop=stop,
                    )
                )
            roles.create_task(_run_then_stop(projector.run(stop=stop), stop))
    finally:
        await bus.close()
        await database.dispose()


async def _run_then_stop(main: Coroutine[Any, Any, Any], stop: asyncio.Event) -> None:
    """Run ``main``; when it ends (or fails) set ``stop`` so its sibling tasks end too."""
    try:
        await main
    finally:
        stop.set()


async def run_reaper(settings: ReaperSettings) -> None:
    from storage.reaper import run_reaper as reap_forever

    store = ObjectStore(s3_config(settings))
    await store.ensure_bucket()
    bus = await _connect(settings)
    try:
        stop = stop_on_signals()
        log.info("reaper_ready", interval_s=settings.interval_s)
        report_ready(settings.ready_file, role="reaper")
        async with metrics_endpoint(settings.metrics_host, settings.metrics_port):
            await reap_forever(store, bus, interval_s=settings.interval_s, stop=stop)
    finally:
        await bus.close()


def _keys(value: SecretStr) -> tuple[str, ...]:
    return tuple(k.strip() for k in value.get_secret_value().split(",") if k.strip())


def ingress_config(settings: IngressSettings) -> IngressConfig:
    keys = _keys(settings.api_keys)
    loaded = load_role_catalog(settings)
    return IngressConfig(
        bus_url=settings.bus_url,
        bus_options=bus_options(settings),
        s3=s3_config(settings),
        database_url=settings.database_url,
        database_pool_size=settings.database_pool_size,
        database_pool_overflow=settings.database_pool_overflow,
        catalog=loaded.catalog,
        lora_previews=loaded.lora_previews,
        api_keys=keys,
        key_secret=settings.key_secret.get_secret_value(),
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        header_timeout_s=settings.header_timeout_s,
        max_streams=settings.max_streams,
        max_connections=settings.max_connections,
        admin_keys=_keys(settings.admin_keys),
        allow_anonymous=settings.allow_anonymous,
        quota=QuotaLimits(
            active_jobs=settings.quota_active_jobs,
            daily_images=settings.quota_daily_images,
            max_queue_depth=settings.max_queue_depth,
        ),
        rate_limits=RateLimits(
            requests_per_key=settings.rate_limit_key,
            requests_per_ip=settings.rate_limit_ip,
            window_s=settings.rate_limit_window_s,
            sync_interval_s=settings.rate_limit_sync_s,
            trusted_proxy_hops=settings.trusted_proxy_hops,
        ),
        stall_after_s=settings.stall_after_s,
        enrich=EnrichConfig(
            url=settings.enrich_url,
            model=settings.enrich_model,
            api_key=settings.enrich_api_key.get_secret_value() if settings.enrich_api_key else None,
        ),
    )


async def run_ingress(settings: IngressSettings) -> None:
    import uvicorn

    from ingress.app import create_app
    from ingress.hardening import uvicorn_options

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # Ours below instead: uvicorn's re-raises the signal after a graceful stop, so the
            # process would die of it rather than exit 0 as the other roles do.
            yield

    config = ingress_config(settings)
    app = create_app(config, spans=bool(settings.otlp_endpoint))  # a span no exporter takes is pure cost
    server = Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level="warning",
            # Its access lines are info, never shown at this level, yet each request still built
            # one (the client address and the quoted path): about 3% of a cheap request's CPU.
            access_log=False,
            lifespan="on",
            # The client address stays the peer's: how far X-Forwarded-For is trusted is decided
            # by IMAGEBUS_INGRESS_TRUSTED_PROXY_HOPS alone (uvicorn would trust it from localhost).
            proxy_headers=False,
            # A head deadline and size cap, and a connection bound (uvicorn has neither by default).
            **uvicorn_options(config),
            # On SIGTERM, requests in flight get this long to finish. Without a bound uvicorn waits
            # for every open event stream to end, which they never do (clients reconnect elsewhere).
            timeout_graceful_shutdown=INGRESS_SHUTDOWN_GRACE_S,
        )
    )

    def request_exit() -> None:
        # A second signal stops waiting for the requests in flight, as uvicorn's own handler does.
        server.force_exit = server.should_exit
        server.should_exit = True

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_exit)
    log.info("ingress_ready", url=f"http://{settings.host}:{settings.port}")
    with contextlib.suppress(asyncio.CancelledError):
        await server.serve()
